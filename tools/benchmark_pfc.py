"""Times the Partial FC head alone against its GEMM floor, measured in the same run.

    horovodrun -np 2 -H localhost:2 --gloo python tools/benchmark_pfc.py --num-classes 1000000 \\
        --sample-ratio 0.1 --batch-size 64 --embedding-size 512 --steps 21 --rounds 3

One step = gather -> sample -> bank pull -> logits -> margin softmax -> backward -> memory-bank update, on random
embeddings with uniformly random labels (the sequential mode: nothing of the step is left running when it is
timed). The floor is the head's three matrix products alone on the same shapes (logits, embedding gradient,
centre gradient) through MXNet's oneDNN ``FullyConnected`` with operands already laid out as it wants them.

The machine may be shared, so step and floor are interleaved: the ``--steps`` timed steps are split into
``--rounds`` rounds, every step is followed by one floor, and a round's ratio is its median step / its median
floor. The result is the median of the
rounds' ratios with their min and max. The last line printed (rank 0) is one JSON object: ratio, ratio_min,
ratio_max, ms_per_step, gemm_ms_per_step, phase_ms (median ms of each phase), sample_ms, bank_ms,
peak_anon_mb_per_rank, cpu, blas, ...
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mxnet as mx  # noqa: E402
import horovod.mxnet as hvd  # noqa: E402

from utils.blas_check import blas_cores, cpu_model, warn_if_generic_blas  # noqa: E402
from recognition.dist import barrier  # noqa: E402
from recognition.partial_fc.operator import PartialFC  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--sample-ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=21, help="timed steps, split into --rounds rounds")
    p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved step and floor timings")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bank-location", choices=("device", "host", "disk"), default="device")
    p.add_argument("--disk-dir", default=None, help="folder for --bank-location disk (default: a temp folder)")
    p.add_argument("--kernels", choices=("auto", "numpy", "ndarray"), default="auto")
    p.add_argument("--no-floor", action="store_true", help="skip the GEMM floor (e.g. for out-of-core runs)")
    return p.parse_args(argv)


def anon_rss_mb():
    """Current anonymous resident memory of this process (file-backed pages excluded)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class GemmFloor:
    """The head's three matrix products of one step via FullyConnected, operands pre-transposed."""

    def __init__(self, batch_global, num_sample, dim):
        rng = np.random.default_rng(0)
        self.dim, self.num_sample = dim, num_sample
        self.xn = mx.nd.array(rng.standard_normal((batch_global, dim), dtype=np.float32))
        self.wn = mx.nd.array(rng.standard_normal((num_sample, dim), dtype=np.float32))
        self.grad = mx.nd.array(rng.standard_normal((batch_global, num_sample), dtype=np.float32))
        self.wn_t, self.grad_t, self.xn_t = self.wn.T.copy(), self.grad.T.copy(), self.xn.T.copy()
        mx.nd.waitall()

    def time_ms(self):
        start = time.perf_counter()
        mx.nd.FullyConnected(self.xn, self.wn, no_bias=True, num_hidden=self.num_sample).wait_to_read()  # logits
        mx.nd.FullyConnected(self.grad, self.wn_t, no_bias=True, num_hidden=self.dim).wait_to_read()    # emb grad
        mx.nd.FullyConnected(self.grad_t, self.xn_t, no_bias=True, num_hidden=self.dim).wait_to_read()  # centre grad
        return 1000.0 * (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    if not 1 <= args.rounds <= args.steps:
        raise SystemExit("--rounds must be between 1 and --steps (%d), got %d" % (args.steps, args.rounds))
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        warn_if_generic_blas()
    t0 = time.perf_counter()
    pfc = PartialFC(args.num_classes, args.embedding_size, sample_ratio=args.sample_ratio,
                    bank_location=args.bank_location, kernels=args.kernels, disk_dir=args.disk_dir, seed=0)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng([1, rank])
    floor = None if args.no_floor else GemmFloor(size * args.batch_size, pfc.num_sample, args.embedding_size)
    step_ms, floor_ms, peak_anon = [[] for _ in range(args.rounds)], [[] for _ in range(args.rounds)], anon_rss_mb()
    round_of = np.repeat(np.arange(args.rounds), [len(c) for c in np.array_split(np.arange(args.steps), args.rounds)])
    step_phases = []      # per timed step: {phase: ms}
    total = args.warmup + args.steps
    started = time.perf_counter()
    for step in range(total):
        x = mx.nd.array(rng.standard_normal((args.batch_size, args.embedding_size), dtype=np.float32))
        y = mx.nd.array(rng.integers(0, args.num_classes, args.batch_size), dtype="int64")
        before = dict(pfc.timings)
        barrier()       # the ranks start together: a step's collectives wait only for the step's own work
        start = time.perf_counter()
        loss, grad = pfc.forward_backward(x, y)
        pfc.update(0.1)
        grad.wait_to_read()
        elapsed = 1000.0 * (time.perf_counter() - start)
        # the floor is timed right after each step, so both see the same machine load
        barrier()
        gemm = floor.time_ms() if floor is not None else float("nan")
        round_index = round_of[step - args.warmup] if step >= args.warmup else -1
        if step >= args.warmup:
            step_ms[round_index].append(elapsed)
            floor_ms[round_index].append(gemm)
            step_phases.append({k: 1000.0 * (v - before.get(k, 0.0)) for k, v in pfc.timings.items()})
        peak_anon = max(peak_anon, anon_rss_mb())
        if rank == 0:
            eta = (time.perf_counter() - started) / (step + 1) * (total - step - 1)
            print("step %3d/%d %s %8.1f ms  (GEMM floor %6.1f ms)  loss %.4f  ETA %.0f s"
                  % (step + 1, total, "warm-up  " if step < args.warmup else "round %d/%d" % (round_index + 1,
                     args.rounds), elapsed, gemm, loss, eta), flush=True)
    phases = {k: float(np.median([p.get(k, 0.0) for p in step_phases])) for k in step_phases[-1]}
    ms = float(np.median(np.concatenate(step_ms)))
    ratios = None if floor is None else [float(np.median(s) / np.median(f)) for s, f in zip(step_ms, floor_ms)]
    result = {
        "num_classes": args.num_classes, "sample_ratio": args.sample_ratio, "world_size": size,
        "batch_size": args.batch_size, "embedding_size": args.embedding_size, "num_sample": pfc.num_sample,
        "bank_location": args.bank_location, "kernels": pfc.kernels, "steps": args.steps, "rounds": args.rounds,
        "ms_per_step": round(ms, 2),
        "gemm_ms_per_step": None if floor is None else round(float(np.median(np.concatenate(floor_ms))), 2),
        "ratio": None if ratios is None else round(float(np.median(ratios)), 3),
        "ratio_min": None if ratios is None else round(min(ratios), 3),
        "ratio_max": None if ratios is None else round(max(ratios), 3),
        "round_ratios": None if ratios is None else [round(r, 3) for r in ratios],
        "sample_ms": round(phases.get("sample", 0.0), 2),
        "bank_ms": round(phases.get("bank_pull", 0.0) + phases.get("bank_push", 0.0), 2),
        "phase_ms": {k: round(v, 2) for k, v in sorted(phases.items())},
        "init_s": round(init_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "peak_anon_mb": round(peak_anon, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_model(), "blas": blas_cores(), "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    gathered = hvd.allgather(mx.nd.array([[result["peak_anon_mb"], result["peak_rss_mb"]]]), name="bench.mem")
    result["peak_anon_mb_per_rank"] = [round(float(v), 1) for v in gathered.asnumpy()[:, 0]]
    if rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
