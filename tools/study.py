"""Run a named grid of training runs (tools/study_grids.py) and write its report: the learning-quality study.

    python tools/study.py main --root /work/study --report docs/quality.md
    python tools/study.py tiny --root /tmp/tiny_study                    # the tool's own test, ~1 minute
    python tools/study.py main --root /work/study --list                 # rows and their state

For every row: the data set (tools/make_synthetic.py, tools/make_synthetic_ijb.py, and curve.bin, the first
pairs of holdout.bin, verified during training) is made once under ROOT/data/NAME; recognition/train.py runs
through horovodrun (--gloo) into ROOT/runs/ROW/model with --resume, checkpointing every few steps; then
eval/verification.py scores the last export on holdout.bin and eval/ijb.py on the IJB set; ROOT/runs/ROW/
result.json marks the row done. Rerunning the same command skips finished rows and data sets and continues an
interrupted run from its last checkpoint. SIGTERM / SIGINT stop the running step's processes (train.py
checkpoints on SIGTERM) and the study; so does killing the process group. Everything a child prints goes to
ROOT/runs/ROW/*.log; the study's own lines (progress, ETA) to stdout and ROOT/GRID.log.

After every row the report (--report, default ROOT/GRID.md) is rewritten between the markers
<!-- study:GRID:begin --> and <!-- study:GRID:end --> (text outside them is kept), with its plot beside it.
"""
import argparse
import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import study_report  # noqa: E402
from tools.study_grids import GRIDS  # noqa: E402

log = logging.getLogger("study")


def atomic_json(path, value):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def flag_value(flags, name, default=None):
    """The last value of ``--name`` in a flag list (as argparse takes it)."""
    value = default
    for i, item in enumerate(flags[:-1]):
        if item == name:
            value = flags[i + 1]
    return value


def verify_every(steps, points, checkpoint_every):
    """train.py's --verbose for about ``points`` verifications of a ``steps``-step run (one more comes after the
    last step): the smallest interval >= steps / points that never lands on a checkpoint step (a multiple of
    ``checkpoint_every``, or the last step). This dates from before ``Backbone.get_params`` waited for BatchNorm's
    statistics, when a verification right before a checkpoint could leave the previous step's statistics in it;
    it stays so that the rows of a grid started then keep their flags."""
    every = max(1, -(-steps // points))
    # with checkpoint_every 1 every step is a checkpoint; only the last step is avoided then
    while every < steps and ((checkpoint_every > 1 and every % checkpoint_every == 0) or steps % every == 0):
        every += 1
    return every


class Study:
    """Runs the rows of ``grid`` under ``root``; ``runner(cmd, log_path, env, echo)`` -> (exit status, output)."""

    def __init__(self, name, grid, root, report):
        self.name, self.grid, self.root, self.report = name, grid, os.path.abspath(root), report
        self.python = sys.executable
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        self.horovodrun = horovodrun if os.path.exists(horovodrun) else "horovodrun"
        self.child, self.stop_signal, self.lock = None, 0, None

    # ------------------------------------------------------------------------------------------ plumbing
    def acquire_lock(self):
        os.makedirs(self.root, exist_ok=True)
        self.lock = open(os.path.join(self.root, "study.lock"), "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError("another study (or a child it left running) holds %s; stop it first"
                               % os.path.join(self.root, "study.lock"))

    def on_signal(self, signum, frame):
        """Stop the running child: SIGTERM to the train.py ranks themselves when there are (they agree on a step,
        checkpoint and exit; horovodrun would give them only 5 s before SIGKILL), else to its process group."""
        self.stop_signal = signum
        child = self.child
        if child is None or child.poll() is not None:
            return
        log.warning("signal %d: stopping the running step (training checkpoints first)", signum)
        import psutil
        try:
            ranks = [p for p in psutil.Process(child.pid).children(recursive=True)
                     if p.name().startswith("python") and "recognition/train.py" in p.cmdline()]
        except psutil.Error:
            ranks = []
        for proc in ranks:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        if not ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)

    def run(self, cmd, log_path, env=None, echo=None):
        """Run ``cmd`` from the repository root in its own process group, appending its output to
        ``log_path``; lines for which ``echo(line)`` is true are logged. Returns (exit status, output text)."""
        if self.stop_signal:
            raise SystemExit(128 + self.stop_signal)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        lines = []
        with open(log_path, "ab") as out:
            out.write(("\n$ %s    # %s\n" % (shlex.join(cmd), time.strftime("%Y-%m-%d %H:%M:%S"))).encode())
            out.flush()
            # the lock's descriptor goes to the child: a child outliving a killed study keeps the lock held
            self.child = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          pass_fds=(self.lock.fileno(),) if self.lock else ())
            for raw in self.child.stdout:
                out.write(raw)
                out.flush()
                line = raw.decode(errors="replace").rstrip()
                lines.append(line)
                if echo and echo(line):
                    log.info("  %s", line)
            status = self.child.wait()
            self.child = None
        if self.stop_signal:
            log.warning("stopped on signal %d; rerun the same command to continue", self.stop_signal)
            raise SystemExit(128 + self.stop_signal)
        return status, "\n".join(lines)

    def must(self, cmd, log_path, what, **kwargs):
        status, output = self.run(cmd, log_path, **kwargs)
        if status != 0:
            tail = "\n".join(output.splitlines()[-25:])
            raise RuntimeError("%s failed (exit %d); its last lines (all in %s):\n%s" % (what, status, log_path, tail))
        return output

    # ------------------------------------------------------------------------------------------ data sets
    def data_dir(self, name):
        return os.path.join(self.root, "data", name)

    def ensure_data(self, name):
        """Make data set ``name`` once; returns its record ({"images": training images, ...})."""
        spec = self.grid.datasets[name]
        folder = self.data_dir(name)
        marker = os.path.join(folder, "dataset.json")
        identities = int(flag_value(spec.synthetic, "--identities", 1000))
        held = int(flag_value(spec.synthetic, "--holdout", 100))
        make = [self.python, "tools/make_synthetic.py", folder] + list(spec.synthetic)
        ijb = ([self.python, "tools/make_synthetic_ijb.py", os.path.join(folder, "ijb"), "--first-identity",
                str(identities + held)] + list(spec.ijb)) if spec.ijb else None
        wanted = {"make_synthetic": make[1:], "make_synthetic_ijb": ijb[1:] if ijb else None,
                  "curve_pairs": spec.curve_pairs}
        if os.path.isfile(marker):
            done = read_json(marker)
            if {k: done.get(k) for k in wanted} != wanted:
                raise RuntimeError("data set %s was made with other arguments (%s); remove %s or use another --root"
                                   % (name, marker, folder))
            return done
        os.makedirs(folder, exist_ok=True)
        log.info("data set %s: %s", name, spec.about)
        started = time.time()
        self.must(make, os.path.join(folder, "make.log"), "make_synthetic.py for " + name,
                  echo=lambda line: "INFO wrote" in line)
        if ijb:
            self.must(ijb, os.path.join(folder, "make.log"), "make_synthetic_ijb.py for " + name,
                      echo=lambda line: "INFO wrote" in line)
        study_report.write_curve_bin(os.path.join(folder, "holdout.bin"), os.path.join(folder, "curve.bin"),
                                     spec.curve_pairs)
        images = study_report.count_images(folder)
        done = dict(wanted, images=images, seconds=round(time.time() - started, 1))
        atomic_json(marker, done)
        return done

    # ------------------------------------------------------------------------------------------ rows
    def row_dir(self, row):
        return os.path.join(self.root, "runs", row.name)

    def planned_steps(self, row, images):
        flags = list(self.grid.common) + list(row.flags)
        per_epoch = images // (int(flag_value(flags, "--batch-size", 64)) * self.grid.ranks)
        steps = int(float(flag_value(flags, "--num-epochs", 1)) * per_epoch)
        cap = int(flag_value(flags, "--max-steps", 0))
        return min(steps, cap) if cap else steps

    def commands(self, row, data):
        """(train, verification, IJB) commands of ``row``; the evaluations take the last export (``{index}``)."""
        folder, model = self.data_dir(row.data), os.path.join(self.row_dir(row), "model")
        steps = self.planned_steps(row, data["images"])
        train = ([self.horovodrun, "-np", str(self.grid.ranks), "-H", "localhost:%d" % self.grid.ranks, "--gloo",
                  self.python, "recognition/train.py"] + list(self.grid.common) + list(row.flags) +
                 ["--data-dir", folder, "--output", model, "--val-targets", "curve",
                  "--verbose", str(verify_every(steps, self.grid.curve_points, self.grid.checkpoint_every)),
                  "--checkpoint-every", str(self.grid.checkpoint_every), "--keep-exports", "1", "--resume"])
        verify = [self.python, "eval/verification.py", "--model", model + "/model,{index}", "--data-dir", folder,
                  "--target", "holdout", "--json"]
        ijb = ([self.python, "eval/ijb.py", "--model", model + "/model,{index}", "--data-dir",
                os.path.join(folder, "ijb"), "--target", "IJBC", "--result-dir",
                os.path.join(self.row_dir(row), "ijb"), "--json"] if self.grid.datasets[row.data].ijb else None)
        return train, verify, ijb

    def run_row(self, row):
        """Train and evaluate ``row`` unless done; returns its result record."""
        rdir = self.row_dir(row)
        result_path = os.path.join(rdir, "result.json")
        data = self.ensure_data(row.data)
        train, verify, ijb = self.commands(row, data)
        if os.path.isfile(result_path):
            result = read_json(result_path)
            if result["commands"]["train"] != train:
                log.warning("row %s finished with other flags than the grid's now; kept (remove %s to rerun)",
                            row.name, rdir)
            return result
        os.makedirs(rdir, exist_ok=True)
        attempts_path = os.path.join(rdir, "attempts.json")
        attempts = read_json(attempts_path) if os.path.isfile(attempts_path) else []
        model = os.path.join(rdir, "model")
        done_path = os.path.join(rdir, "train_done.json")
        if not os.path.isfile(done_path):
            log.info("row %s: %s on %s, %d steps%s", row.name, row.method, row.data,
                     self.planned_steps(row, data["images"]), " (resuming)" if attempts else "")
            attempts.append({"start": time.time(), "commit": study_report.git_commit(REPO)})
            atomic_json(attempts_path, attempts)
            env = {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}
            try:
                self.must(train, os.path.join(rdir, "train.log"), "training of " + row.name, env=env,
                          echo=lambda line: line.startswith("[0]<stdout>:step") or "Traceback" in line)
            finally:
                attempts[-1]["end"] = time.time()
                atomic_json(attempts_path, attempts)
            atomic_json(done_path, {"export": study_report.last_export(model), "time": time.time()})
        index = read_json(done_path)["export"]
        evals = {}
        for key, cmd in (("verification", verify), ("ijb", ijb)):
            if cmd is None:
                continue
            path = os.path.join(rdir, key + ".json")
            if not os.path.isfile(path):
                cmd = [part.replace("{index}", str(index)) for part in cmd]
                output = self.must(cmd, os.path.join(rdir, key + ".log"), "%s of %s" % (key, row.name),
                                   env={"OMP_NUM_THREADS": "2"})
                atomic_json(path, study_report.last_json(output))
            evals[key] = read_json(path)
        summary = study_report.log_summary(os.path.join(model, "train_log.jsonl"))
        result = {"row": row.name, "data": row.data, "method": row.method, "commands": {
            "train": train, "verification": verify, "ijb": ijb}, "export": index, "attempts": attempts,
            "images": data["images"], **summary, **evals}
        atomic_json(result_path, result)
        log.info("row %s done: %s", row.name, study_report.one_line(result))
        return result

    # ------------------------------------------------------------------------------------------ grid
    def states(self):
        out = []
        for row in self.grid.rows:
            rdir = self.row_dir(row)
            if os.path.isfile(os.path.join(rdir, "result.json")):
                state = "done"
            elif os.path.isfile(os.path.join(rdir, "train_done.json")):
                state = "trained, evaluation pending"
            elif os.path.isdir(os.path.join(rdir, "model", "checkpoints")):
                state = "interrupted (resumes from its checkpoint)"
            else:
                state = "pending"
            out.append((row, state))
        return out

    def results(self):
        found = {}
        for row in self.grid.rows:
            path = os.path.join(self.row_dir(row), "result.json")
            if os.path.isfile(path):
                found[row.name] = read_json(path)
        return found

    def write_report(self):
        study_report.write_report(self.name, self.grid, self.results(), self.report, self.root,
                                  self.command_line)

    def run_all(self, only=None):
        rows = [row for row in self.grid.rows if only is None or row.name in only]
        total_cost = sum(row.cost for row in rows)
        spent_cost, spent_time = 0.0, 0.0
        for number, row in enumerate(rows, 1):
            was_done = os.path.isfile(os.path.join(self.row_dir(row), "result.json"))
            log.info("[%d/%d] row %s%s", number, len(rows), row.name, " (done)" if was_done else "")
            started = time.time()
            self.run_row(row)
            if not was_done:
                spent_cost += row.cost
                spent_time += time.time() - started
                left = sum(r.cost for r in rows[number:] if not os.path.isfile(
                    os.path.join(self.row_dir(r), "result.json")))
                log.info("grid %s: %d/%d rows done; this session %.0f min; ETA %.0f min (cost-weighted)",
                         self.name, number, len(rows), spent_time / 60, left * spent_time / spent_cost / 60)
            self.write_report()
        log.info("grid %s finished (%g cost units); report %s", self.name, total_cost, self.report)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", choices=sorted(GRIDS), help="the grid (tools/study_grids.py)")
    p.add_argument("--root", required=True, help="folder of the data sets, runs and logs (outside the repository)")
    p.add_argument("--report", help="markdown file to write the grid's section into (default ROOT/GRID.md)")
    p.add_argument("--rows", help="comma-separated row names: run only these")
    p.add_argument("--list", action="store_true", help="list the rows and their state, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished rows")
    args = p.parse_args(argv)
    grid = GRIDS[args.grid]
    only = None
    if args.rows:
        only = {name.strip() for name in args.rows.split(",") if name.strip()}
        unknown = only - {row.name for row in grid.rows}
        if unknown:
            p.error("--rows: no row %s in grid %s (rows: %s)" % (", ".join(sorted(unknown)), args.grid,
                                                                  ", ".join(row.name for row in grid.rows)))
    report = os.path.abspath(args.report or os.path.join(args.root, args.grid + ".md"))
    study = Study(args.grid, grid, args.root, report)
    study.command_line = shlex.join(["python", "tools/study.py"] + (sys.argv[1:] if argv is None else list(argv)))
    if args.list:
        for row, state in study.states():
            print("%-22s %-8s %-50s %s" % (row.name, row.data, row.method, state))
        return 0
    os.makedirs(study.root, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(study.root, args.grid + ".log"))])
    if args.report_only:
        study.write_report()
        return 0
    try:
        study.acquire_lock()
        for sig in (signal.SIGTERM, signal.SIGINT):        # not SIGHUP: nohup's ignoring it stays
            signal.signal(sig, study.on_signal)
        log.info("study %s under %s (%s); report %s", args.grid, study.root, study.command_line, report)
        study.run_all(only)
    except RuntimeError as error:
        log.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
