"""Plot a training log (the JSON lines recognition/progress.py writes) as a PNG for the README.

    python tools/plot_log.py models/synthetic_mbf_arcface/train_log.jsonl docs/training.png
    python tools/plot_log.py --compare pfc=demo_output/model/train_log.jsonl \
        ffc=demo_output/model_ffc/train_log.jsonl docs/demo_pfc_vs_ffc.png

Top panel: loss (left axis) and learning rate (right axis) against the step. Bottom panel, when the log holds
verification results: accuracy of every set against the step. A resumed run's repeated steps are taken from
the resumed part only. ``--compare LABEL=LOG ...`` draws several runs (e.g. two training methods, whose steps
differ in cost) against the wall time since each run's first step: loss on top, accuracy below.
"""
import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from recognition.progress import current_history, read_log  # noqa: E402
from utils import cli  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402


def load_series(path):
    """{"step", "loss", "lr": float arrays (NaN where the log has null), "eval": {set: (steps, accuracies)}}
    from the log at ``path``. Raises FileNotFoundError for a missing file, ValueError for a log without steps."""
    if not os.path.isfile(path):
        raise FileNotFoundError("no such log file: %s" % path)
    history = current_history(read_log(path))
    train = [r for r in history if "loss" in r]
    if not train:
        raise ValueError("%s holds no training records (lines with step and loss); is it a train_log.jsonl?"
                         % path)

    def column(key, records):
        return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=np.float64)

    evals = {}
    for record in history:
        for name, scores in record.get("eval", {}).items():
            evals.setdefault(name, ([], []))
            evals[name][0].append(record["step"])
            evals[name][1].append(np.nan if scores.get("accuracy") is None else scores["accuracy"])
    times = {}
    for record in history:
        if "time" in record and "step" in record:
            times.setdefault(record["step"], record["time"])
    return {"step": column("step", train), "loss": column("loss", train), "lr": column("lr", train),
            "time": column("time", train), "eval_time": {k: np.array([times.get(step, np.nan) for step in s])
                                                         for k, (s, _) in evals.items()},
            "eval": {k: (np.array(s, np.float64), np.array(a, np.float64)) for k, (s, a) in sorted(evals.items())}}


def plot(series, out_path, title=None):
    """Draw ``series`` (from ``load_series``) and write it to ``out_path`` as a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if series["eval"] else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(series["step"], series["loss"], color="tab:blue", label="loss")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_axis = ax.twinx()
    lr_axis.plot(series["step"], series["lr"], color="tab:orange", label="lr")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    if title:
        ax.set_title(title)
    if series["eval"]:
        acc = axes[1][0]
        for name, (steps, accuracy) in series["eval"].items():
            acc.plot(steps, accuracy, marker="o", label=name)
        acc.set_ylabel("verification accuracy")
        acc.grid(alpha=0.3)
        acc.legend(loc="lower right")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())


def plot_compare(runs, out_path, title=None):
    """Draw several runs ({label: series}) against minutes since each run's first logged step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True)
    for label, series in runs.items():
        start = np.nanmin(series["time"])
        line, = loss_ax.plot((series["time"] - start) / 60, series["loss"], label=label)
        for name, (_, accuracy) in series["eval"].items():
            acc_ax.plot((series["eval_time"][name] - start) / 60, accuracy, marker="o", color=line.get_color(),
                        label="%s %s" % (label, name))
    loss_ax.set_ylabel("training loss (each method's own)")
    acc_ax.set_ylabel("verification accuracy")
    acc_ax.set_xlabel("minutes of training")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        loss_ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after a one-line error naming the file or value)."""
    parser = argparse.ArgumentParser(description="Plot loss / lr / verification accuracy of a training log.")
    parser.add_argument("paths", nargs="+", metavar="LOG OUT",
                        help="train_log.jsonl written by recognition/train.py and the PNG to write; with --compare: "
                        "LABEL=LOG ... OUT")
    parser.add_argument("--title", help="title above the plot")
    parser.add_argument("--compare", action="store_true", help="several runs against wall time")
    args = parser.parse_args(argv)
    if len(args.paths) < 2 or (not args.compare and len(args.paths) != 2):
        parser.error("give LOG OUT, or --compare LABEL=LOG [LABEL=LOG ...] OUT")
    out = args.paths[-1]

    def body():
        cli.check_output_file(out, "OUT")
        if args.compare:
            runs = {}
            for item in args.paths[:-1]:
                label, sep, path = item.partition("=")
                if not sep or not label:
                    raise ValueError("--compare takes LABEL=LOG, got %r" % item)
                runs[label] = load_series(path)
            plot_compare(runs, out, title=args.title)
            print("plot_log: %d runs -> %s" % (len(runs), out))
            return
        series = load_series(args.paths[0])
        plot(series, out, title=args.title)
        print("plot_log: %d training points, %d verification set(s) -> %s"
              % (len(series["step"]), len(series["eval"]), out))
    return cli.run(body, "plot_log")


if __name__ == "__main__":
    sys.exit(main())
