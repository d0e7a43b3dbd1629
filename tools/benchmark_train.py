"""Full training-step throughput (backbone + Partial FC head + Horovod) on the synthetic reader.

    horovodrun -np 2 -H localhost:2 --gloo python tools/benchmark_train.py --backbone mbf --batch-size 64 --steps 10

Prints one line per step on rank 0 and finally one JSON object: samples_per_sec (global, median step),
ms_per_step, the median time of each phase (backbone forward, Partial FC head, backbone backward with the
Horovod allreduce and SGD, head update; Trainer.train_step waits for MXNet's engine between them) and the
head's share of the step.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", "--network", dest="network", default="mbf",
                   help="mbf, r18, r34, r50, r100, r200 (--network is rejected after horovodrun)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000000)
    p.add_argument("--sample-ratio", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ctx", default="cpu")
    p.add_argument("--act-type", default="prelu", help="backbone activation: prelu, prelu_conv, relu")
    args = p.parse_args(argv)
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    cfg = config_from_args(["--dataset", "bench_1m", "--network", args.network, "--batch-size", str(args.batch_size),
                            "--num-classes", str(args.num_classes), "--sample-ratio", str(args.sample_ratio),
                            "--ctx", args.ctx, "--act-type", args.act_type, "--output", os.path.join("models", "bench_train")])
    trainer = Trainer(cfg)
    times, phases = [], []
    for i, batch in enumerate(trainer.method.reader.epoch(0)):
        if i == args.warmup + args.steps:
            break
        step_phases = {}
        start = time.perf_counter()
        loss = trainer.train_step(batch, phase_times=step_phases)
        elapsed = time.perf_counter() - start
        trainer.step += 1
        if i >= args.warmup:
            times.append(elapsed)
            phases.append(step_phases)
        if hvd.rank() == 0:
            print("step %d  %.2f s  loss %.3f  %s" % (i, elapsed, loss, "  ".join(
                "%s %.2f" % kv for kv in step_phases.items())), flush=True)
    ms = 1000 * float(np.median(times))
    result = {"network": args.network, "act_type": args.act_type, "world_size": hvd.size(), "batch_size": args.batch_size,
              "num_classes": args.num_classes, "sample_ratio": args.sample_ratio,
              "ms_per_step": round(ms, 1),
              "samples_per_sec": round(args.batch_size * hvd.size() / (ms / 1000.0), 2),
              "phase_ms": {k: round(1000 * float(np.median([p[k] for p in phases])), 1) for k in phases[0]},
              "head_share": round(float(np.median([(p["head"] + p["head_update"]) / t
                                                   for p, t in zip(phases, times)])), 3),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if hvd.rank() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
