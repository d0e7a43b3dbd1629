"""Times the Partial FC head alone against the floor of its three matrix products on this CPU.

    horovodrun -np 2 -H localhost:2 --gloo python tools/benchmark_pfc.py --num-classes 1000000 \\
        --sample-ratio 0.1 --batch-size 64 --embedding-size 512 --steps 21 --rounds 3

One step = gather -> sample -> bank pull -> logits -> margin softmax -> backward -> memory-bank update, on random
embeddings with uniformly random labels (the sequential mode: nothing of the step is left running when it is
timed). Two floors are timed after every step, at the head's shapes (B the global batch, k this rank's sampled
centres, D the width): logits B x D . D x k, embedding gradient B x k . k x D, centre gradient k x B . B x D.

- The **independent floor** runs in a separate process per rank, started before the head exists, with code
  written for the benchmark alone (``tools/pfc_floor.py``): every kernel available for each product, timed at
  start-up, the fastest of each kept; its centre gradient runs over pre-transposed rows in blocks of
  ``--block-rows``.
- The **bank floor**, timed in that process right after the products: the gather of the k sampled rows from a
  shard of this rank's size and one SGD-with-momentum pass over them, the memory traffic any bank of weights
  and momenta in host memory adds (``pfc_floor.BankPasses``). It is reported beside the products' floor
  (``bank_floor_ms``, ``ratio_with_bank``), not inside ``ratio``.
- The **chosen floor** is the head's own products (``recognition/partial_fc/products.py``) with the kernels the
  head picked at its first step, timed alone in the benchmark's process as the head runs them.

The machine may be shared, so step and floors are interleaved: the ``--steps`` timed steps are split into
``--rounds`` rounds, every step is followed by one of each floor, and a round's ratio is its median step over its
median floor. The results are the median of the rounds' ratios with their min and max. The last line printed
(rank 0) is one JSON object: ratio / ratio_min / ratio_max (step / independent floor), ratio_chosen (step /
chosen floor), ratio_with_bank (step / independent floor + bank floor), ms_per_step, floor_ms, bank_floor_ms,
chosen_floor_ms, the kernels and per-product ms of both floors, the head's choice and its timings, phase_ms (median ms of each phase), peak_anon_mb_per_rank, cpu, blas, ...
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

from tools.pfc_floor import PRODUCTS, FloorWorker  # noqa: E402
from utils.blas_check import blas_cores, cpu_model, warn_if_generic_blas  # noqa: E402


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
    p.add_argument("--block-rows", type=int, default=4096, help="rows per centre-gradient block of the floor")
    p.add_argument("--floor-rounds", type=int, default=2, help="timed rounds of the independent floor's kernel "
                   "choice (after one warm-up round; each kernel's best counts)")
    p.add_argument("--no-floor", action="store_true", help="skip both floors (e.g. for out-of-core runs)")
    p.add_argument("--no-bank-floor", action="store_true", help="skip the bank floor (it holds another copy of "
                   "the shard and its momentum per rank)")
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


class ChosenFloor:
    """The head's own products (``products.py``) with the kernels it chose, on random operands of its shapes."""

    def __init__(self, choice, batch, k, dim, block_rows):
        rng = np.random.default_rng(1)
        self.choice, self.k, self.block_rows = choice, k, block_rows
        self.x = rng.standard_normal((batch, dim), dtype=np.float32)
        self.w = rng.standard_normal((k, dim), dtype=np.float32)
        self.z = np.empty((batch, k), np.float32)
        self.scratch = np.empty((min(block_rows, k), batch), np.float32)
        self.c = np.empty((min(block_rows, k), dim), np.float32)

    def time_ms(self):
        from recognition.partial_fc import products
        t0 = time.perf_counter()
        product = products.LogitsProduct(self.x, self.w, self.z, self.choice["logits"], self.choice["embedding"])
        t1 = time.perf_counter()
        product.data_grad()
        t2 = time.perf_counter()
        centre = products.CentreProduct(self.x, self.choice["centre"])
        for lo in range(0, self.k, self.block_rows):
            hi = min(lo + self.block_rows, self.k)
            centre.block(self.z, lo, hi, self.scratch, self.c[:hi - lo])
        t3 = time.perf_counter()
        return dict(zip(PRODUCTS, (1000.0 * (t1 - t0), 1000.0 * (t2 - t1), 1000.0 * (t3 - t2))))


def ratios(step_ms, floor_ms):
    """(median, min, max, per-round) of the rounds' median step / median floor."""
    per_round = [float(np.median(s) / np.median([sum(f.values()) for f in fl])) for s, fl in zip(step_ms, floor_ms)]
    return (round(float(np.median(per_round)), 3), round(min(per_round), 3), round(max(per_round), 3),
            [round(r, 3) for r in per_round])


def product_medians(floor_ms, names=PRODUCTS):
    """{product: median ms}, and the median total, over every timed floor (``names``: its parts)."""
    every = [f for fl in floor_ms for f in fl]
    return ({p: round(float(np.median([f[p] for f in every])), 2) for p in names},
            round(float(np.median([sum(f.values()) for f in every])), 2))


def main(argv=None):
    args = parse_args(argv)
    if not 1 <= args.rounds <= args.steps:
        raise SystemExit("--rounds must be between 1 and --steps (%d), got %d" % (args.steps, args.rounds))
    import horovod.mxnet as hvd
    from recognition.dist import barrier, shard_range
    from recognition.partial_fc.kernels_cpu import UPDATE_BLOCK_FLOATS
    from recognition.partial_fc.operator import PartialFC
    from recognition.partial_fc.sampler import num_sample_for
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        warn_if_generic_blas()
    batch, dim = size * args.batch_size, args.embedding_size
    start, end = shard_range(args.num_classes, size, rank)
    k = num_sample_for(end - start, args.sample_ratio)
    floor = None
    if not args.no_floor:       # before the head exists, on every rank at once (the ranks' products overlap)
        barrier()
        t0 = time.perf_counter()
        floor = FloorWorker(batch, k, dim, args.block_rows, args.floor_rounds,
                            0 if args.no_bank_floor else end - start)
        if rank == 0:
            print("independent floor (%.1f s): %s" % (time.perf_counter() - t0, json.dumps(floor.info)), flush=True)
        barrier()
    try:
        t0 = time.perf_counter()
        pfc = PartialFC(args.num_classes, dim, sample_ratio=args.sample_ratio, bank_location=args.bank_location,
                        kernels=args.kernels, disk_dir=args.disk_dir, seed=0)
        init_s = time.perf_counter() - t0
        result = run_steps(args, pfc, floor, batch, k, dim, UPDATE_BLOCK_FLOATS // dim, rank, size, barrier)
        result["init_s"] = round(init_s, 2)
    finally:
        if floor is not None:
            floor.close()
    gathered = hvd.allgather(mx.nd.array([[result["peak_anon_mb"], result["peak_rss_mb"]]]), name="bench.mem")
    result["peak_anon_mb_per_rank"] = [round(float(v), 1) for v in gathered.asnumpy()[:, 0]]
    if rank == 0:
        print(json.dumps(result), flush=True)


def run_steps(args, pfc, floor, batch, k, dim, head_block_rows, rank, size, barrier):
    """The warm-up and timed steps, each followed by both floors; returns the result dict (rank's own)."""
    rng = np.random.default_rng([1, rank])
    chosen = None
    step_ms, floor_ms, chosen_ms, bank_ms = ([[] for _ in range(args.rounds)] for _ in range(4))
    peak_anon = anon_rss_mb()
    round_of = np.repeat(np.arange(args.rounds), [len(c) for c in np.array_split(np.arange(args.steps), args.rounds)])
    step_phases = []      # per timed step: {phase: ms}
    total = args.warmup + args.steps
    started = time.perf_counter()
    for step in range(total):
        x = mx.nd.array(rng.standard_normal((args.batch_size, dim), dtype=np.float32))
        y = mx.nd.array(rng.integers(0, args.num_classes, args.batch_size), dtype="int64")
        before = dict(pfc.timings)
        barrier()       # the ranks start together: a step's collectives wait only for the step's own work
        start = time.perf_counter()
        loss, grad = pfc.forward_backward(x, y)
        pfc.update(0.1)
        grad.wait_to_read()
        elapsed = 1000.0 * (time.perf_counter() - start)
        choice = getattr(pfc._head, "choice", None)     # the CPU kernel set's products (None: the NDArray set)
        if floor is not None and chosen is None and choice is not None:
            chosen = ChosenFloor(choice, batch, k, dim, head_block_rows)
        # the floors are timed right after each step, so all see the same machine load (the bank floor with
        # the products' floor, in its process)
        barrier()
        indep, bank = floor.time_ms() if floor is not None else (None, None)
        barrier()
        own = chosen.time_ms() if chosen is not None else None
        r = round_of[step - args.warmup] if step >= args.warmup else -1
        if step >= args.warmup:
            step_ms[r].append(elapsed)
            floor_ms[r].append(indep)
            bank_ms[r].append(bank)
            chosen_ms[r].append(own)
            step_phases.append({name: 1000.0 * (v - before.get(name, 0.0)) for name, v in pfc.timings.items()})
        peak_anon = max(peak_anon, anon_rss_mb())
        if rank == 0:
            eta = (time.perf_counter() - started) / (step + 1) * (total - step - 1)
            print("step %3d/%d %s %8.1f ms  (floor %s, bank %s, chosen %s ms)  loss %.4f  ETA %.0f s"
                  % (step + 1, total, "warm-up  " if step < args.warmup else "round %d/%d" % (r + 1, args.rounds),
                     elapsed, "%.1f" % sum(indep.values()) if indep else "-",
                     "%.1f" % sum(bank.values()) if bank else "-",
                     "%.1f" % sum(own.values()) if own else "-", loss, eta), flush=True)
    phases = {name: float(np.median([p.get(name, 0.0) for p in step_phases])) for name in step_phases[-1]}
    result = {
        "num_classes": args.num_classes, "sample_ratio": args.sample_ratio, "world_size": size,
        "batch_size": args.batch_size, "embedding_size": dim, "num_sample": pfc.num_sample,
        "bank_location": args.bank_location, "kernels": pfc.kernels, "steps": args.steps, "rounds": args.rounds,
        "ms_per_step": round(float(np.median(np.concatenate(step_ms))), 2),
    }
    if floor is not None:
        result["ratio"], result["ratio_min"], result["ratio_max"], result["round_ratios"] = ratios(step_ms, floor_ms)
        result["floor_product_ms"], result["floor_ms"] = product_medians(floor_ms)
        result["floor_kernels"], result["floor_candidate_ms"] = floor.info["kernels"], floor.info["candidate_ms"]
        if not args.no_bank_floor:      # products + bank passes, timed together after each step
            with_bank = [[{**f, **b} for f, b in zip(fl, bl)] for fl, bl in zip(floor_ms, bank_ms)]
            result["ratio_with_bank"], result["ratio_with_bank_min"], result["ratio_with_bank_max"], _ = \
                ratios(step_ms, with_bank)
            result["bank_floor_pass_ms"], result["bank_floor_ms"] = product_medians(bank_ms, names=("gather", "update"))
    if chosen is not None:
        (result["ratio_chosen"], result["ratio_chosen_min"], result["ratio_chosen_max"],
         result["round_ratios_chosen"]) = ratios(step_ms, chosen_ms)
        result["chosen_product_ms"], result["chosen_floor_ms"] = product_medians(chosen_ms)
    choice = getattr(pfc._head, "choice", None)
    if choice is not None:
        result["head_kernels"], result["head_choice_how"] = choice.kernels, choice.how
        result["head_choice_s"], result["head_choice_rows"] = round(choice.seconds, 3), choice.timed_rows
        result["head_choice_ms"] = choice.ms and {p: {kn: round(v, 2) for kn, v in m.items()}
                                                  for p, m in choice.ms.items()}
    result.update({
        "sample_ms": round(phases.get("sample", 0.0), 2),
        "bank_ms": round(phases.get("bank_pull", 0.0) + phases.get("bank_push", 0.0), 2),
        "phase_ms": {name: round(v, 2) for name, v in sorted(phases.items())},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "peak_anon_mb": round(peak_anon, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_model(), "blas": blas_cores(), "load_avg": [round(v, 2) for v in os.getloadavg()],
    })
    return result


if __name__ == "__main__":
    main()
