"""Training progress: every N steps a line a person reads (rank 0 only) and a JSON-lines log for tools/plot_log.py.

Log records, one JSON object a line, appended and flushed as they happen (a crash loses at most the line
being written):
    {"event": "start", "step": S, "total_steps": T, "batch_size_global": B, "time": t}   once per (re)start
    {"step", "epoch", "loss", "lr", "samples_per_sec", "eta_s", "time", ...extra}          every printed step
    {"step", "eval": {set: {"accuracy", ...}}, "time"}                                       every verification
Non-finite numbers are written as null, so the file stays strict JSON.
"""
import json
import math
import os
import time

import numpy as np


class PhaseClock:
    """Adds the seconds since the last tick to ``timings[phase]`` (the phases of a step, for benchmarks and logs).

    ``wait=True`` (timing a whole training step) first waits for MXNet's asynchronous engine: for ``result`` (an
    NDArray) when given, else for every queued operation, so a phase is charged its own work. ``timings`` None:
    does nothing (and never waits).
    """

    def __init__(self, timings, wait=False):
        self.timings, self.wait, self.last = timings, bool(wait), time.perf_counter()

    def tick(self, phase, result=None):
        if self.timings is None:
            return
        if self.wait:
            import mxnet as mx
            if result is None:
                mx.nd.waitall()
            else:
                result.wait_to_read()
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def format_duration(seconds):
    """h:mm:ss (hours unbounded)."""
    seconds = int(round(max(0.0, seconds)))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def _plain(value):
    """A JSON-ready copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ProgressLogger:
    """Prints step, epoch, loss, lr, samples/s and ETA every ``frequent`` steps (and at the last step) and
    appends the same as a JSON line to ``log_path``. On ranks other than 0 every method does nothing.

    samples/s: steps since the previous printed line x global batch / the seconds between the two lines.
    ETA: remaining steps x the mean seconds per step since the first printed line (the first interval, which
    holds start-up costs, counts only until a second line exists).
    """

    def __init__(self, total_steps, batch_size_global, frequent=50, log_path=None, rank=0, start_step=0,
                 print_fn=print, clock=time.monotonic):
        self.total_steps, self.batch = int(total_steps), int(batch_size_global)
        self.frequent = max(1, int(frequent))
        self.active = rank == 0
        self.log_path = log_path if self.active else None
        self.print_fn, self.clock = print_fn, clock
        self.start_step = self.last_step = int(start_step)
        self.start_time = self.last_time = clock()
        self.reference = None           # (step, time) of the first printed line: ETA is measured from there
        if self.log_path:
            folder = os.path.dirname(os.path.abspath(self.log_path))
            os.makedirs(folder, exist_ok=True)
            self._append({"event": "start", "step": self.start_step, "total_steps": self.total_steps,
                          "batch_size_global": self.batch, "time": time.time()})

    def step(self, step, epoch, loss, lr, **extra):
        """Report that ``step`` steps are done (``loss`` and ``lr`` those of the last one); prints and logs when
        ``step`` is a multiple of ``frequent`` or the last step. Returns the logged record, else None."""
        if not self.active or (step % self.frequent and step != self.total_steps) or step <= self.last_step:
            return None
        now = self.clock()
        speed = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        if self.reference is None:
            per_step = (now - self.start_time) / (step - self.start_step)
            self.reference = (step, now)
        else:
            per_step = (now - self.reference[1]) / (step - self.reference[0])
        eta = per_step * max(0, self.total_steps - step)
        self.last_step, self.last_time = step, now
        record = {"step": int(step), "epoch": int(epoch), "loss": float(loss), "lr": float(lr),
                  "samples_per_sec": round(speed, 2), "eta_s": round(eta, 1), "time": time.time()}
        record.update(extra)
        record = _plain(record)
        extras = "".join("  %s %s" % (k, _short(v)) for k, v in extra.items())
        self.print_fn("step %d/%d  epoch %d  loss %.4f  lr %.6g  %.1f samples/s  ETA %s%s"
                      % (step, self.total_steps, epoch, loss, lr, speed, format_duration(eta), extras))
        self._append(record)
        return record

    def log_eval(self, step, results):
        """Print and log verification results ``{set name: {"accuracy": ..., other numbers ...}}``."""
        if not self.active:
            return None
        for name in sorted(results):
            scores = results[name]
            if "accuracy" not in scores:
                raise ValueError("verification result of %r has no 'accuracy' (keys: %s)"
                                 % (name, ", ".join(sorted(scores))))
            others = "".join("  %s %s" % (k, _short(v)) for k, v in sorted(scores.items()) if k != "accuracy")
            self.print_fn("step %d  verification %s: accuracy %.5f%s" % (step, name, scores["accuracy"], others))
        record = _plain({"step": int(step), "eval": results, "time": time.time()})
        self._append(record)
        return record

    def _append(self, record):
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def _short(value):
    return "%.5g" % value if isinstance(value, (float, np.floating)) else str(value)


def read_log(path):
    """The records of a JSON-lines training log, in file order. A torn last line (a crash mid-write) is
    skipped; any other undecodable line raises ValueError naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):      # the last line, without its newline: torn by a crash
                break
            raise ValueError("%s line %d is not a JSON record: %.80r" % (path, number, line))
    return records


def current_history(records):
    """The records of the run as it stands after resumes: a ``start`` event at step S drops the records of
    steps > S written before it (the part of an interrupted run after its last checkpoint, done again)."""
    kept = []
    for record in records:
        if record.get("event") == "start":
            kept = [r for r in kept if r["step"] <= record["step"]]
        elif "step" in record:
            kept.append(record)
    return kept
