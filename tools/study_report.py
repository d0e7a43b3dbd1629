"""tools/study.py's file helpers and its report: the table, the holdout-accuracy plot, the comparisons of each
claim and the exact commands, written into a markdown file between the grid's markers."""
import json
import os
import pickle
import re
import shlex
import subprocess
import time

import numpy as np

_EXPORT = re.compile(r"^model-(\d{4,})\.params$")


# ------------------------------------------------------------------------------------------------ files
def write_curve_bin(holdout, out, pairs):
    """``out``: the first ``pairs`` pairs of the .bin ``holdout`` (the set verified during training)."""
    with open(holdout, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    pairs = min(pairs, len(issame))
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump((bins[:2 * pairs], issame[:pairs]), f, protocol=4)
    os.replace(tmp, out)


def count_images(folder):
    """Training images of a make_synthetic.py folder (its labels.npz)."""
    with np.load(os.path.join(folder, "labels.npz")) as labels:
        return int(len(labels["label"]))


def git_commit(repo):
    """The commit checked out in ``repo`` (with '+dirty' when tracked files differ), or 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def last_export(model_dir):
    """Number of the newest legacy export model-NNNN.params in ``model_dir``."""
    found = [int(m.group(1)) for m in map(_EXPORT.match, os.listdir(model_dir)) if m]
    if not found:
        raise RuntimeError("training left no model-NNNN.params in %s" % model_dir)
    return max(found)


def last_json(output):
    """The last line of ``output`` that is a JSON object (what an evaluation CLI prints with --json)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the output: %s" % output[-500:])


def log_summary(path):
    """{"steps", "train_seconds", "curve": [[step, accuracy]], "last_loss"} of a train_log.jsonl as it stands
    after resumes: train_seconds adds, per session, the time from its start event to its last record that a
    later resume kept (start-up before the first step and the work lost to an interruption are left out)."""
    sessions = []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip().startswith("{") and line.strip().endswith("}")]
    for record in records:
        if record.get("event") == "start":
            for session in sessions:
                session[1][:] = [r for r in session[1] if r["step"] <= record["step"]]
            sessions.append([record["time"], []])
        elif "step" in record and sessions:
            sessions[-1][1].append(record)
    kept = [r for _, rs in sessions for r in rs]
    seconds = sum(max(r["time"] for r in rs) - start for start, rs in sessions if rs)
    curve = sorted((r["step"], r["eval"]["curve"]["accuracy"]) for r in kept if "curve" in r.get("eval", {}))
    losses = [r for r in kept if "loss" in r]
    return {"steps": max((r["step"] for r in kept), default=0), "train_seconds": round(seconds, 1),
            "curve": [list(c) for c in curve], "last_loss": losses[-1]["loss"] if losses else None}


# ------------------------------------------------------------------------------------------------ figures
def figures(result):
    """The table's numbers of a row result (None where missing)."""
    holdout = result.get("verification", {}).get("sets", {}).get("holdout", {})
    ijb = result.get("ijb") or {}
    tar = ijb.get("tar_at_far", {})
    return {"acc": holdout.get("accuracy"), "acc_std": holdout.get("accuracy_std"), "val": holdout.get("val"),
            "holdout_auc": holdout.get("auc"), "tar3": tar.get("0.001"), "tar2": tar.get("0.01"),
            "ijb_auc": ijb.get("auc")}


def one_line(result):
    f = figures(result)
    return ("holdout %s ± %s, VAL@1e-3 %s, IJB TAR@1e-3 %s / 1e-2 %s, %d steps in %.1f min"
            % (_pct(f["acc"]), _pct(f["acc_std"]), _pct(f["val"]), _pct(f["tar3"]), _pct(f["tar2"]),
               result["steps"], result["train_seconds"] / 60))


def _pct(value, sign=False):
    if value is None:
        return "-"
    return ("%+.2f" if sign else "%.2f") % (100 * value)


def _flag(flags, name, default="?"):
    """The last value of ``--name`` in a flag list."""
    value = default
    for i, item in enumerate(flags[:-1]):
        if item == name:
            value = flags[i + 1]
    return value


def table(grid, results):
    head = ("| data | row | method and settings | epochs | steps | train wall (min) | holdout acc ± std (%) | "
            "VAL@FAR=1e-3 (%) | IJB TAR@FAR=1e-3 (%) | TAR@FAR=1e-2 (%) | IJB AUC | holdout AUC |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in grid.rows:
        r = results.get(row.name)
        if r is None:
            lines.append("| %s | %s | %s | | | | not run yet | | | | | |" % (row.data, row.name, row.method))
            continue
        f = figures(r)
        lines.append("| %s | %s | %s | %s | %d | %.1f | %s ± %s | %s | %s | %s | %s | %s |" % (
            row.data, row.name, row.method, _flag(r["commands"]["train"], "--num-epochs"), r["steps"], r["train_seconds"] / 60,
            _pct(f["acc"]), _pct(f["acc_std"]), _pct(f["val"]), _pct(f["tar3"]), _pct(f["tar2"]),
            "-" if f["ijb_auc"] is None else "%.4f" % f["ijb_auc"],
            "-" if f["holdout_auc"] is None else "%.4f" % f["holdout_auc"]))
    return "\n".join(lines)


def comparisons(grid, results):
    lines = []
    for claim, pairs in grid.claims:
        lines += ["", "**%s**" % claim, "",
                  "| comparison (a - b) | holdout acc | VAL@FAR=1e-3 | IJB TAR@FAR=1e-3 | TAR@FAR=1e-2 |",
                  "|---|---|---|---|---|"]
        for what, a, b in pairs:
            if a not in results or b not in results:
                lines.append("| %s | pending | | | |" % what)
                continue
            fa, fb = figures(results[a]), figures(results[b])
            diff = ["-" if fa[k] is None or fb[k] is None else _pct(fa[k] - fb[k], sign=True)
                    for k in ("acc", "val", "tar3", "tar2")]
            lines.append("| %s | %s |" % (what, " | ".join(diff)))
    return "\n".join(lines)


def plot(grid, results, out_path):
    """Holdout accuracy (curve.bin) against the step for every finished row, one panel per data set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(grid.datasets)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False, sharey=True)
    for ax, data in zip(axes[0], names):
        for row in grid.rows:
            r = results.get(row.name)
            if row.data != data or not r or not r["curve"]:
                continue
            steps, acc = zip(*r["curve"])
            ax.plot(steps, acc, marker="o", label="%s (%s)" % (row.name, row.method))
        ax.set_title("%s: %s" % (data, grid.datasets[data].about[:60]), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("holdout accuracy (curve.bin, verified in training)")
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_path)


def section(name, grid, results, plot_name, root, command_line):
    from utils.blas_check import cpu_model
    commits = sorted({a.get("commit", "?") for r in results.values() for a in r["attempts"]})
    out = ["### Grid `%s`: %s" % (name, grid.title), "",
           "Written by `%s` on %s; %d of %d rows finished. Machine: %s, %d cores (shared with other work while "
           "this ran). Code: %s." % (command_line, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     len(results), len(grid.rows), cpu_model(), os.cpu_count(),
                                     ", ".join("`%s`" % c for c in commits) or "-"), "",
           "Data sets (under `%s/data`):" % root, ""]
    for data, spec in grid.datasets.items():
        first = sum(int(_flag(spec.synthetic, name, default)) for name, default in (("--identities", 1000),
                                                                                  ("--holdout", 100)))
        out.append("- `%s`: %s. `python tools/make_synthetic.py DIR %s`%s" % (
            data, spec.about, " ".join(spec.synthetic),
            "; IJB: `python tools/make_synthetic_ijb.py DIR/ijb --first-identity %d %s`"
            % (first, " ".join(spec.ijb)) if spec.ijb else ""))
    out += ["", "Common training flags: `%s`." % " ".join(grid.common), "", table(grid, results), "",
            "Train wall: the time of the steps kept in `train_log.jsonl` (verification of curve.bin included; "
            "start-up and steps lost to an interruption excluded). Holdout figures: `eval/verification.py` on all "
            "of holdout.bin (10 folds); IJB: `eval/ijb.py` on the synthetic IJB-C-layout set.", "",
            "![holdout accuracy against steps](%s)" % plot_name if results else "(no row finished yet)", ""]
    if grid.claims:
        out += ["Comparisons (a - b, in points):", comparisons(grid, results), ""]
    out += ["<details><summary>Exact commands of the finished rows</summary>", ""]
    for row in grid.rows:
        r = results.get(row.name)
        if r:
            out += ["`%s`:" % row.name, "", "```"] + [shlex.join(c).replace("{index}", str(r["export"]))
                                                      for c in r["commands"].values() if c] + ["```", ""]
    out.append("</details>")
    return "\n".join(out)


def write_report(name, grid, results, report_path, root, command_line):
    """Replace the grid's section of ``report_path`` (created if missing) and write its plot beside it."""
    folder = os.path.dirname(report_path) or "."
    os.makedirs(folder, exist_ok=True)
    plot_name = "quality_%s.png" % name
    if results:
        plot(grid, results, os.path.join(folder, plot_name))
    begin, end = "<!-- study:%s:begin -->" % name, "<!-- study:%s:end -->" % name
    block = "%s\n%s\n%s" % (begin, section(name, grid, results, plot_name, root, command_line), end)
    text = open(report_path).read() if os.path.isfile(report_path) else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, report_path)
