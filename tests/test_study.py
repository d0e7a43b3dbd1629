"""tools/study.py: a grid's rows run once, resume after an interruption, stop their training ranks on a signal, and
the report; one real end-to-end row of the ``tiny`` grid (horovodrun, train.py, verification, IJB)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tools import make_synthetic, make_synthetic_ijb, study, study_report
from tools.study_grids import GRIDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = GRIDS["tiny"]


def write_log(path, records):
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_log_summary_counts_only_the_steps_a_resume_kept(tmp_path):
    path = str(tmp_path / "train_log.jsonl")
    write_log(path, [{"event": "start", "step": 0, "time": 100.0},
                     {"step": 1, "loss": 5.0, "time": 110.0}, {"step": 2, "loss": 4.0, "time": 120.0},
                     {"step": 2, "eval": {"curve": {"accuracy": 0.6}}, "time": 125.0},
                     {"step": 3, "loss": 3.5, "time": 130.0}])                  # killed after step 3; ckpt at 2
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')                                             # a torn last line
    with open(path, "a") as f:
        f.write("\n")
    write_log(path, [{"event": "start", "step": 2, "time": 500.0},
                     {"step": 3, "loss": 3.4, "time": 507.0}, {"step": 4, "loss": 3.0, "time": 514.0},
                     {"step": 4, "eval": {"curve": {"accuracy": 0.8}}, "time": 520.0}])
    summary = study_report.log_summary(path)
    # session 1 kept up to step 2 (its eval at 125 s): 25 s; session 2: 20 s
    assert summary == {"steps": 4, "train_seconds": 45.0, "curve": [[2, 0.6], [4, 0.8]], "last_loss": 3.0}


def test_flag_value_and_planned_steps(tmp_path):
    assert study.flag_value(["--a", "1", "--b", "2", "--a", "3"], "--a") == "3"
    assert study.flag_value(["--a"], "--a", "none") == "none"
    s = study.Study("main", GRIDS["main"], str(tmp_path), str(tmp_path / "r.md"))
    assert s.planned_steps(GRIDS["main"].rows[0], 7500) == 117            # 7500 // (32 x 2 ranks), one epoch
    assert study.Study("tiny", TINY, str(tmp_path), "x").planned_steps(TINY.rows[0], 48) == 2   # --max-steps
    gap = study.Study("ffc_gap", GRIDS["ffc_gap"], str(tmp_path), "x")     # a row's --num-epochs wins
    assert [gap.planned_steps(row, 7500) for row in GRIDS["ffc_gap"].rows] == [117, 117, 234, 351]


def test_every_grid_compares_rows_it_has_and_reuses_rows_unchanged():
    for name, grid in GRIDS.items():
        rows = {row.name: row for row in grid.rows}
        assert len(rows) == len(grid.rows), name
        assert all(row.data in grid.datasets for row in grid.rows), name
        for _, pairs in grid.claims:
            assert all(a in rows and b in rows for _, a, b in pairs), name
    # rows shared with the main grid are the same runs (same data, same flags): reused, not rerun
    main = {row.name: row for row in GRIDS["main"].rows}
    for row in GRIDS["ffc_gap"].rows:
        if row.name in main:
            assert row == main[row.name] and GRIDS["ffc_gap"].datasets[row.data] == GRIDS["main"].datasets[row.data]


def test_verifications_never_come_right_before_a_checkpoint():
    assert study.verify_every(117, 3, 10) == 41          # 39 divides 117 (the final checkpoint), 40 is one
    assert study.verify_every(118, 3, 10) == 41
    assert study.verify_every(120, 4, 7) == 31
    for steps, points, every in ((117, 3, 10), (200, 4, 10), (93, 2, 5), (50, 3, 1)):
        v = study.verify_every(steps, points, every)
        assert v >= steps / points and steps % v and (every == 1 or v % every)
    assert study.verify_every(2, 1, 1) == 2              # the tiny grid: a 2-step run verifies at its end


class FakeRunner:
    """Stands in for Study.run: makes the data in this process, fakes training (a log, a checkpoint, an export)
    and the evaluations' JSON; ``fail_train`` rows exit 1 after their first step, once."""

    def __init__(self, fail_train=()):
        self.calls, self.fail_train = [], set(fail_train)

    def __call__(self, cmd, log_path, env=None, echo=None):
        script = next(part for part in cmd if part.endswith(".py"))
        self.calls.append((os.path.basename(script), cmd))
        args = cmd[cmd.index(script) + 1:]
        if script.endswith("make_synthetic.py"):
            make_synthetic.main(args)
            return 0, "INFO wrote"
        if script.endswith("make_synthetic_ijb.py"):
            return make_synthetic_ijb.main(args), "INFO wrote"
        if script.endswith("train.py"):
            assert "--resume" in args and args[args.index("--val-targets") + 1] == "curve"
            out = study.flag_value(args, "--output")
            os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
            log = os.path.join(out, "train_log.jsonl")
            start = 1 if os.path.isfile(log) else 0
            write_log(log, [{"event": "start", "step": start, "time": 10.0 * start}])
            row = os.path.basename(os.path.dirname(out))
            if row in self.fail_train:
                self.fail_train.discard(row)
                write_log(log, [{"step": 1, "loss": 2.0, "time": 5.0}, {"step": 2, "loss": 1.0, "time": 9.0}])
                return 1, "[0]<stdout>:step 1/2\nTraceback: killed"
            write_log(log, [{"step": s, "loss": 1.0 / s, "time": 10.0 * s} for s in range(start + 1, 3)] +
                      [{"step": 2, "eval": {"curve": {"accuracy": 0.75}}, "time": 21.0}])
            open(os.path.join(out, "model-0002.params"), "wb").close()
            return 0, "[0]<stdout>:step 2/2"
        if script.endswith("verification.py"):
            assert args[args.index("--model") + 1].endswith("model,2")
            return 0, 'table\n{"sets": {"holdout": {"accuracy": 0.9, "accuracy_std": 0.01, "val": 0.5, "auc": 0.95}}}'
        if script.endswith("ijb.py"):
            return 0, '{"auc": 0.97, "tar_at_far": {"0.001": 0.4, "0.01": 0.7}}'
        raise AssertionError("unexpected command %s" % cmd)


def make_study(root, runner):
    s = study.Study("tiny", TINY, str(root), str(root / "report.md"))
    s.command_line, s.run = "python tools/study.py tiny", runner
    return s


def names(calls):
    return [name for name, _ in calls]


def test_rows_run_once_resume_after_an_interruption_and_report(tmp_path):
    runner = FakeRunner(fail_train={"tiny_r0.5"})
    s = make_study(tmp_path, runner)
    with pytest.raises(RuntimeError, match="(?s)training of tiny_r0.5 failed .exit 1.*Traceback: killed"):
        s.run_all()
    assert names(runner.calls) == ["make_synthetic.py", "make_synthetic_ijb.py", "train.py", "verification.py",
                                   "ijb.py", "train.py"]
    assert [state for _, state in s.states()] == ["done", "interrupted (resumes from its checkpoint)"]
    report = open(tmp_path / "report.md").read()
    assert "| tiny | tiny_r1.0 | Partial FC r=1, seed 0 | 1 | 2 |" in report
    assert "| tiny | tiny_r0.5 | Partial FC r=0.5, seed 0 | | | | not run yet |" in report
    assert "| r=0.5 - r=1.0 | pending |" in report

    # the same command again: the data and the finished row are kept, the interrupted row resumes
    runner = FakeRunner()
    s = make_study(tmp_path, runner)
    s.run_all()
    assert names(runner.calls) == ["train.py", "verification.py", "ijb.py"]
    result = json.load(open(tmp_path / "runs" / "tiny_r0.5" / "result.json"))
    assert len(result["attempts"]) == 2 and all("end" in a for a in result["attempts"])
    assert result["steps"] == 2 and result["curve"] == [[2, 0.75]]
    assert result["train_seconds"] == pytest.approx(5.0 + 11.0)   # step 1 of the first try kept, then 10 -> 21 s
    assert result["verification"]["sets"]["holdout"]["accuracy"] == 0.9
    report = open(tmp_path / "report.md").read()
    assert "| tiny | tiny_r0.5 | Partial FC r=0.5, seed 0 | 1 | 2 | 0.3 | 90.00 ± 1.00 | 50.00 | 40.00 | 70.00 |" \
        in report
    assert "| r=0.5 - r=1.0 | +0.00 | +0.00 | +0.00 | +0.00 |" in report
    assert os.path.isfile(tmp_path / "quality_tiny.png")

    # a lost evaluation is redone alone; then nothing is left to run
    os.remove(tmp_path / "runs" / "tiny_r1.0" / "result.json")
    os.remove(tmp_path / "runs" / "tiny_r1.0" / "ijb.json")
    runner = FakeRunner()
    make_study(tmp_path, runner).run_all()
    assert names(runner.calls) == ["ijb.py"]
    runner = FakeRunner()
    make_study(tmp_path, runner).run_all()
    assert runner.calls == []


def test_report_keeps_the_text_outside_its_markers(tmp_path):
    runner = FakeRunner()
    report = tmp_path / "report.md"
    report.write_text("# Title\n\nhand-written findings\n")
    make_study(tmp_path, runner).run_all()
    first = report.read_text()
    assert first.startswith("# Title\n\nhand-written findings\n<!-- study:tiny:begin -->")
    report.write_text(first + "\nmore text after\n")
    make_study(tmp_path, FakeRunner()).write_report()
    again = report.read_text()
    assert again.count("<!-- study:tiny:begin -->") == 1 and again.endswith("\nmore text after\n")


def test_a_data_set_made_with_other_arguments_is_an_error(tmp_path):
    make_study(tmp_path, FakeRunner()).ensure_data("tiny")
    marker = tmp_path / "data" / "tiny" / "dataset.json"
    record = json.loads(marker.read_text())
    record["make_synthetic"][-1] = "7"
    marker.write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="data set tiny was made with other arguments"):
        make_study(tmp_path, FakeRunner()).ensure_data("tiny")


FAKE_TRAIN = """import os, signal, sys, time
def stop(signum, frame):
    open(os.environ["MARK"], "w").write("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_signal_reaches_the_training_ranks_and_stops_the_study(tmp_path):
    (tmp_path / "recognition").mkdir()
    (tmp_path / "recognition" / "train.py").write_text(FAKE_TRAIN)
    mark = tmp_path / "mark"
    s = study.Study("tiny", TINY, str(tmp_path), "x")
    s.acquire_lock()
    # a shell between the study and the rank, as horovodrun's launcher is; only the rank gets the signal
    cmd = ["sh", "-c", "cd %s && %s recognition/train.py; echo shell-went-on" % (tmp_path, sys.executable)]
    started = time.time()
    with pytest.raises(SystemExit) as stop:
        s.run(cmd, str(tmp_path / "fake.log"), env={"MARK": str(mark)},
              echo=lambda line: line == "ready" and s.on_signal(signal.SIGTERM, None))
    assert stop.value.code == 128 + signal.SIGTERM and time.time() - started < 30
    assert mark.read_text() == "SIGTERM"
    assert "shell-went-on" in open(tmp_path / "fake.log").read()     # the shell was not killed, the rank was
    with pytest.raises(RuntimeError, match="holds .*study.lock"):     # one study per root at a time
        study.Study("tiny", TINY, str(tmp_path), "x").acquire_lock()


def test_tiny_grid_row_end_to_end(tmp_path):
    """The real thing on one row: data, 2-rank training, verification, IJB, report; a rerun does nothing."""
    cmd = [sys.executable, "tools/study.py", "tiny", "--root", str(tmp_path), "--rows", "tiny_r1.0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.load(open(tmp_path / "runs" / "tiny_r1.0" / "result.json"))
    holdout = result["verification"]["sets"]["holdout"]
    assert result["steps"] == 2 and result["curve"] and 0 <= holdout["accuracy"] <= 1
    assert result["ijb"]["num_pairs"] > 0 and "0.001" in result["ijb"]["tar_at_far"]
    assert "| tiny | tiny_r1.0 | Partial FC r=1, seed 0 | 1 | 2 |" in open(tmp_path / "tiny.md").read()
    assert os.path.isfile(tmp_path / "quality_tiny.png") and os.path.isfile(tmp_path / "tiny.log")
    train_log = open(tmp_path / "runs" / "tiny_r1.0" / "train.log").read()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "(done)" in again.stdout
    assert open(tmp_path / "runs" / "tiny_r1.0" / "train.log").read() == train_log
    listing = subprocess.run(cmd[:5] + ["--list"], cwd=ROOT, capture_output=True, text=True)
    assert "tiny_r1.0" in listing.stdout and "done" in listing.stdout and "pending" in listing.stdout
