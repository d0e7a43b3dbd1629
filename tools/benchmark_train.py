"""Full training-step throughput (backbone + Partial FC head + Horovod) on the synthetic reader.

    horovodrun -np 2 -H localhost:2 --gloo python tools/benchmark_train.py --backbone mbf --act-type prelu_conv \\
        --batch-size 64 --num-classes 1000000 --sample-ratio 0.1 --steps 4

Prints one line per step on rank 0 and finally one JSON object: samples_per_sec (global, median step),
ms_per_step, the median time of each phase (the head's prepare: label gather, sampling, starting the bank pull;
backbone forward; Partial FC head; backbone backward with the Horovod allreduce and SGD; head update.
Trainer.train_step waits for MXNet's engine between them) and the head's share of the step.

``--versus CLASSES,RATIO,BANK`` (repeatable) times more settings in the same processes, interleaved with the
first one: each of ``--rounds`` rounds runs ``--steps`` steps of every setting in turn, and each setting's
ratio to the first is the median over the rounds of (its median step / the first's median step), with min and
max. Every setting keeps its own trainer (backbone, bank) in memory: the example below peaked at about 21 GB
of the 24 GB machine in total (2 ranks). For example the out-of-core bank against the in-memory one:

    horovodrun -np 2 -H localhost:2 --gloo python tools/benchmark_train.py --backbone mbf --act-type prelu_conv \\
        --num-classes 1000000 --sample-ratio 0.1 --bank-location device \\
        --versus 10000000,0.01,disk --disk-dir /var/tmp/pfcbank --rounds 3 --steps 2
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

BANKS = ("device", "host", "disk")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", "--network", dest="network", default="mbf",
                   help="mbf, r18, r34, r50, r100, r200 (--network is rejected after horovodrun)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000000)
    p.add_argument("--sample-ratio", type=float, default=0.1)
    p.add_argument("--bank-location", choices=BANKS, default="device")
    p.add_argument("--disk-dir", default=None, help="folder of --bank-location disk (default: a temporary folder)")
    p.add_argument("--sequential-bank", action="store_true",
                   help="pull and push the bank inside the step (no overlap with the backbone)")
    p.add_argument("--versus", action="append", default=[], metavar="CLASSES,RATIO,BANK",
                   help="another setting, timed interleaved with the first (repeatable)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of --steps steps per setting")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first")
    p.add_argument("--ctx", default="cpu")
    p.add_argument("--act-type", default="prelu", help="backbone activation: prelu, prelu_conv, relu")
    args = p.parse_args(argv)
    settings = [(args.num_classes, args.sample_ratio, args.bank_location)]
    for text in args.versus:
        try:
            classes, ratio, bank = text.split(",")
            settings.append((int(classes), float(ratio), bank))
        except ValueError:
            p.error("--versus %r: expected CLASSES,RATIO,BANK, e.g. 10000000,0.01,disk" % text)
        if bank not in BANKS:
            p.error("--versus %r: the bank is one of %s" % (text, ", ".join(BANKS)))
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    return args, settings


def setting_name(classes, ratio, bank):
    return "%s classes, ratio %g, %s bank" % (format(classes, ","), ratio, bank)


def build_trainer(args, classes, ratio, bank):
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    argv = ["--dataset", "bench_1m", "--network", args.network, "--batch-size", str(args.batch_size),
            "--num-classes", str(classes), "--sample-ratio", str(ratio), "--bank-location", bank,
            "--ctx", args.ctx, "--act-type", args.act_type, "--output", os.path.join("models", "bench_train")]
    if bank == "disk" and args.disk_dir:
        argv += ["--bank-dir", args.disk_dir]
    argv += ["--no-bank-pipeline"] if args.sequential_bank else []
    trainer = Trainer(config_from_args(argv))
    # the start-up broadcasts run asynchronously; the next trainer's carry the same tensor names
    import mxnet as mx
    mx.nd.waitall()
    return trainer, trainer.method.reader.epoch(0)


def run_steps(trainer, batches, count, label, rank, times, phases):
    """``count`` steps; appends each step's seconds and phase seconds when the lists are given."""
    for _ in range(count):
        step_phases = {}
        start = time.perf_counter()
        loss = trainer.train_step(next(batches), phase_times=step_phases)
        elapsed = time.perf_counter() - start
        trainer.step += 1
        if times is not None:
            times.append(elapsed)
            phases.append(step_phases)
        if rank == 0:
            print("%s step %d  %.2f s  loss %.3f  %s" % (label, trainer.step, elapsed, loss, "  ".join(
                "%s %.2f" % kv for kv in step_phases.items())), flush=True)


def summary(times, phases, args, world):
    ms = 1000 * float(np.median(times))
    return {"ms_per_step": round(ms, 1),
            "samples_per_sec": round(args.batch_size * world / (ms / 1000.0), 2),
            "phase_ms": {k: round(1000 * float(np.median([p[k] for p in phases])), 1) for k in phases[0]},
            "head_share": round(float(np.median([sum(p.get(k, 0.0) for k in ("head_prepare", "head", "head_update"))
                                                 / t for p, t in zip(phases, times)])), 3)}


def main(argv=None):
    args, settings = parse_args(argv)
    import horovod.mxnet as hvd
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    from utils.blas_check import blas_cores, cpu_model, warn_if_generic_blas
    if rank == 0:
        warn_if_generic_blas()
    runs = [build_trainer(args, *setting) for setting in settings]
    for (trainer, batches), setting in zip(runs, settings):
        run_steps(trainer, batches, args.warmup, "warm-up [%s]" % setting_name(*setting), rank, None, None)
    times = [[[] for _ in range(args.rounds)] for _ in settings]
    phases = [[] for _ in settings]
    for r in range(args.rounds):
        for i, ((trainer, batches), setting) in enumerate(zip(runs, settings)):
            run_steps(trainer, batches, args.steps, "round %d/%d [%s]" % (r + 1, args.rounds, setting_name(*setting)),
                      rank, times[i][r], phases[i])
    results = []
    for i, (classes, ratio, bank) in enumerate(settings):
        entry = {"num_classes": classes, "sample_ratio": ratio, "bank_location": bank}
        entry.update(summary(np.concatenate(times[i]), phases[i], args, world))
        if i:
            ratios = [float(np.median(times[i][r]) / np.median(times[0][r])) for r in range(args.rounds)]
            entry.update(ratio_vs_first=round(float(np.median(ratios)), 3), ratio_min=round(min(ratios), 3),
                         ratio_max=round(max(ratios), 3), round_ratios=[round(v, 3) for v in ratios])
        results.append(entry)
    result = {"network": args.network, "act_type": args.act_type, "world_size": world, "batch_size": args.batch_size,
              "bank_pipeline": not args.sequential_bank, "rounds": args.rounds, "steps_per_round": args.steps}
    result.update(results[0])
    if len(results) > 1:
        result["versus"] = results[1:]
    import resource
    import mxnet as mx
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peaks = hvd.allgather(mx.nd.array([peak]), name="bench.peak_rss").asnumpy()
    result.update(peak_rss_mb_per_rank=[round(float(v)) for v in peaks],
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpu=cpu_model(), blas=blas_cores(), load_avg=[round(v, 2) for v in os.getloadavg()])
    if rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
