"""Times FFC's head (the dynamic class queue) alone at any number of identities, beside its product floor and,
optionally, Partial FC, all in one run.

    OMP_NUM_THREADS=1 horovodrun -np 2 -H localhost:2 --gloo python tools/benchmark_ffc.py \\
        --num-identities 1000000 10000000 100000000 --pfc-classes 1000000 --queue-size 30000 --batch-size 64 \\
        --steps 32

One FFC step is what the trainer does with the queue: side A, ``forward_backward(x, y, keep=False)``, then side
B, ``forward_backward(y, x, keep=True)``, with x = [ids; c] and y = [ids; d] per rank (B identities drawn from the
whole range, in both halves, plus B/2 instance labels each: 1.5 B probe and gallery rows per side). Each queue
starts full (Q distinct random identities in a random LRU order), so every step inserts, hits and evicts as in
a long run; features are random. ``--pfc-classes`` adds Partial FC (sample ratio ``--pfc-sample-ratio``, bank in
RAM) as tools/benchmark_pfc.py times it: forward_backward + update of B random rows per rank.

Every round runs one step of each case, in a random order (the same on every rank), then the floor: the four
large products of an FFC step alone (per side: probe x bank logits and the probe gradient from the bank) through
oneDNN ``FullyConnected`` with operands laid out as it wants them. So all cases and the floor see the same
machine load; figures are medians over the timed rounds. Peak memory counts the whole process (every case and the
floor's operands): run one case alone for a case's memory. The last line printed (rank 0) is one JSON object:
floor_ms_per_step, floor_cpu_ms_per_step, peak_anon_mb_per_rank, and per case (``cases``): ms_per_step (wall),
ms_without_collectives (less the phases that hold the collectives and so the waits for the other rank),
cpu_ms_per_step (CPU time of the process, all threads: the cost whatever the scheduling), phase_ms (the head's
own timings), FFC's side_a_ms / side_b_ms / ratio_to_floor / cpu_ratio_to_floor; with several cases
paired_ratio_to_first (and ..._without_collectives, ..._cpu): the median over rounds of a case's figure over the
first case's in the same round.
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

from recognition.ffc.class_queue import DynamicClassQueue  # noqa: E402
from recognition.partial_fc.operator import PartialFC  # noqa: E402
from tools.benchmark_pfc import anon_rss_mb  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-identities", type=int, nargs="+", default=[1_000_000],
                   help="labels are drawn from [0, this); several values: one queue each, all in every round")
    p.add_argument("--queue-size", type=int, default=30_000)
    p.add_argument("--batch-size", type=int, default=64, help="B, identities per rank and step")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--loss", choices=("arcface", "cosface", "sv"), default="arcface")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-floor", action="store_true", help="skip the product floor")
    p.add_argument("--pfc-classes", type=int, nargs="*", default=[],
                   help="also step Partial FC with this many classes in the same rounds (its bank in RAM)")
    p.add_argument("--pfc-sample-ratio", type=float, default=0.1)
    return p.parse_args(argv)


def full_queue_state(dcq, num_identities, seed):
    """A full queue: Q distinct labels of [0, num_identities) in a random LRU order on shuffled slots, random
    next-row bits; the same on every rank (one seed)."""
    rng = np.random.default_rng(seed)
    q = dcq.queue_size
    labels = np.unique(rng.integers(0, num_identities, 2 * q + 16))
    if labels.size < q:
        raise ValueError("--num-identities %d is too small to fill a queue of %d" % (num_identities, q))
    state = dcq.state_dict()
    state["slots"] = np.stack([rng.permutation(labels)[:q], rng.permutation(q)], axis=1).astype(np.int64)
    state["next_row"] = rng.integers(0, 2, q).astype(np.uint8)
    return state


class ProductFloor:
    """The large products of one side: logits (n x D . D x Q) and the probe gradient (n x Q . Q x D)."""

    def __init__(self, rows, queue_size, dim):
        rng = np.random.default_rng(0)
        self.queue_size, self.dim = queue_size, dim
        self.probe = mx.nd.array(rng.standard_normal((rows, dim), dtype=np.float32))
        self.bank = mx.nd.array(rng.standard_normal((queue_size, dim), dtype=np.float32))
        self.bank_t = self.bank.T.copy()
        self.grad = mx.nd.array(rng.standard_normal((rows, queue_size), dtype=np.float32))
        mx.nd.waitall()

    def time_ms(self):
        """(wall, CPU) milliseconds of one step's products."""
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(2):     # sides A and B
            mx.nd.FullyConnected(self.probe, self.bank, no_bias=True, num_hidden=self.queue_size).wait_to_read()
            mx.nd.FullyConnected(self.grad, self.bank_t, no_bias=True, num_hidden=self.dim).wait_to_read()
        return 1000.0 * (time.perf_counter() - start), 1000.0 * (time.process_time() - cpu_start)


class Timings:
    """Per-step wall time, wall time less the collectives (their waits are the other rank's noise) and CPU time."""

    def __init__(self):
        self.step_ms, self.busy_ms, self.cpu_ms, self.phase_start = [], [], [], None

    def record(self, wall_s, waited_s, cpu_s):
        self.step_ms.append(1000.0 * wall_s)
        self.busy_ms.append(1000.0 * (wall_s - waited_s))
        self.cpu_ms.append(1000.0 * cpu_s)

    def summary(self, timings, steps):
        phases = {k: 1000.0 * (v - self.phase_start.get(k, 0.0)) / steps for k, v in timings.items()}
        return {"ms_per_step": round(float(np.median(self.step_ms)), 2),
                "ms_without_collectives": round(float(np.median(self.busy_ms)), 2),
                "cpu_ms_per_step": round(float(np.median(self.cpu_ms)), 2),
                "phase_ms": {k: round(v, 2) for k, v in sorted(phases.items())}}


class FfcCase(Timings):
    """One number of identities: its queue (full from the start), its label stream and its timings."""

    def __init__(self, args, num_identities, rank):
        super().__init__()
        self.num_identities, self.name = num_identities, "ffc %s" % format(num_identities, ",")
        t0 = time.perf_counter()
        self.dcq = DynamicClassQueue(args.queue_size, args.embedding_size, loss=args.loss, seed=0)
        self.dcq.load_state_dict(full_queue_state(self.dcq, num_identities, seed=1))
        self.init_s = time.perf_counter() - t0
        self.rng = np.random.default_rng([2, rank])
        self.side_ms = {"A": [], "B": []}

    def step(self, b, dim, timed):
        """One FFC step of the head: side A (discarded), then side B (kept). Returns (ms, loss)."""
        rng, half, dcq = self.rng, b // 2, self.dcq
        ids = rng.integers(0, self.num_identities, b)
        x_labels = np.concatenate([ids, rng.integers(0, self.num_identities, half)])
        y_labels = np.concatenate([ids, rng.integers(0, self.num_identities, half)])
        x = mx.nd.array(rng.standard_normal((b + half, dim), dtype=np.float32))
        y = mx.nd.array(rng.standard_normal((b + half, dim), dtype=np.float32))
        if timed and self.phase_start is None:
            self.phase_start = dict(dcq.timings)
        collectives = dcq.timings["gather"] + dcq.timings["loss_sync"]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_a, grad_a = dcq.forward_backward(x, x_labels, y, y_labels, keep=False)
        grad_a.wait_to_read()
        mid = time.perf_counter()
        loss_b, grad_b = dcq.forward_backward(y, y_labels, x, x_labels, keep=True)
        grad_b.wait_to_read()
        end, cpu_end = time.perf_counter(), time.process_time()
        if timed:
            waited = dcq.timings["gather"] + dcq.timings["loss_sync"] - collectives
            self.record(end - start, waited, cpu_end - cpu_start)
            self.side_ms["A"].append(1000.0 * (mid - start))
            self.side_ms["B"].append(1000.0 * (end - mid))
        return 1000.0 * (end - start), loss_a + loss_b

    def summary(self, steps):
        return {"head": "ffc", "num_identities": self.num_identities, **super().summary(self.dcq.timings, steps),
                "side_a_ms": round(float(np.median(self.side_ms["A"])), 2),
                "side_b_ms": round(float(np.median(self.side_ms["B"])), 2),
                "init_s": round(self.init_s, 2), "queue_identities": self.dcq.num_identities,
                "probe_targets_last": self.dcq.last_stats["probe_targets"]}


class PfcCase(Timings):
    """Partial FC at ``num_classes`` in the same rounds (what tools/benchmark_pfc.py times: one step =
    forward_backward + update on B random rows per rank, sequential bank I/O), for paired comparisons."""

    def __init__(self, args, num_classes, rank):
        super().__init__()
        self.num_classes, self.sample_ratio = num_classes, args.pfc_sample_ratio
        self.name = "pfc %s" % format(num_classes, ",")
        t0 = time.perf_counter()
        self.pfc = PartialFC(num_classes, args.embedding_size, sample_ratio=args.pfc_sample_ratio, seed=0)
        self.init_s = time.perf_counter() - t0
        self.rng = np.random.default_rng([3, rank])

    def step(self, b, dim, timed):
        x = mx.nd.array(self.rng.standard_normal((b, dim), dtype=np.float32))
        y = mx.nd.array(self.rng.integers(0, self.num_classes, b), dtype="int64")
        pfc = self.pfc
        if timed and self.phase_start is None:
            self.phase_start = dict(pfc.timings)
        collectives = pfc.timings["gather"] + pfc.timings["softmax_sync"]
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, grad = pfc.forward_backward(x, y)
        pfc.update(0.1)
        grad.wait_to_read()
        end, cpu_end = time.perf_counter(), time.process_time()
        if timed:
            self.record(end - start, pfc.timings["gather"] + pfc.timings["softmax_sync"] - collectives,
                        cpu_end - cpu_start)
        return 1000.0 * (end - start), loss

    def summary(self, steps):
        return {"head": "pfc", "num_classes": self.num_classes, "sample_ratio": self.sample_ratio,
                "num_sample": self.pfc.num_sample, **super().summary(self.pfc.timings, steps),
                "init_s": round(self.init_s, 2)}


def main(argv=None):
    args = parse_args(argv)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    b, dim = args.batch_size, args.embedding_size
    cases = [FfcCase(args, n, rank) for n in args.num_identities] + [PfcCase(args, n, rank) for n in args.pfc_classes]
    floor = None if args.no_floor else ProductFloor(b + b // 2, args.queue_size, dim)
    floor_ms, floor_cpu_ms, peak_anon = [], [], anon_rss_mb()
    rounds = range(args.warmup + args.steps)
    order_rng = np.random.default_rng(4)      # the same order of cases on every rank (their collectives pair up)
    if rank == 0:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc="ffc head", unit="step", file=sys.stdout, mininterval=5.0)
    for step in rounds:
        timed = step >= args.warmup
        shown = []
        for k in order_rng.permutation(len(cases)):     # several cases: all in every round, in a random order
            case = cases[k]
            ms, loss = case.step(b, dim, timed)
            shown.append("%s: %.0f ms, loss %.2f" % (case.name, ms, loss))
        gemm, gemm_cpu = floor.time_ms() if floor is not None else (float("nan"), float("nan"))
        if timed:
            floor_ms.append(gemm)
            floor_cpu_ms.append(gemm_cpu)
        peak_anon = max(peak_anon, anon_rss_mb())
        if rank == 0:
            rounds.set_postfix_str("%s; floor %.0f ms" % ("; ".join(shown), gemm))
    floor_med = None if floor is None else float(np.median(floor_ms))
    floor_cpu = None if floor is None else float(np.median(floor_cpu_ms))
    results = [case.summary(args.steps) for case in cases]
    for r in results[:len(args.num_identities)]:
        r["ratio_to_floor"] = None if floor_med is None else round(r["ms_per_step"] / floor_med, 3)
        r["cpu_ratio_to_floor"] = None if floor is None else round(r["cpu_ms_per_step"] / floor_cpu, 3)
    result = {
        "num_identities": args.num_identities, "queue_size": args.queue_size, "world_size": size,
        "batch_size": b, "probe_rows_per_side": b + b // 2, "embedding_size": dim, "loss": args.loss,
        "steps": args.steps, "floor_ms_per_step": None if floor_med is None else round(floor_med, 2),
        "floor_cpu_ms_per_step": None if floor_cpu is None else round(floor_cpu, 2),
        "cases": results,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "peak_anon_mb": round(peak_anon, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if len(cases) > 1:     # each step's time over the first case's in the same round (same load), median
        for key, attr in (("paired_ratio_to_first", "step_ms"), ("paired_ratio_without_collectives", "busy_ms"),
                          ("paired_ratio_cpu", "cpu_ms")):
            base = np.array(getattr(cases[0], attr))
            result[key] = [round(float(np.median(np.array(getattr(c, attr)) / base)), 3) for c in cases]
    gathered = hvd.allgather(mx.nd.array([[result["peak_anon_mb"], result["peak_rss_mb"]]]), name="bench.mem")
    result["peak_anon_mb_per_rank"] = [round(float(v), 1) for v in gathered.asnumpy()[:, 0]]
    if rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
