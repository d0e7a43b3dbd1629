"""ProgressLogger's lines and JSON log (with a fake clock, so speeds and ETAs are exact), read_log and resumes."""
import json

import numpy as np
import pytest

from recognition.progress import ProgressLogger, current_history, format_duration, read_log


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run_steps(logger, clock, first, last, seconds_per_step, startup=0.0):
    clock.now += startup
    records = []
    for step in range(first, last + 1):
        clock.now += seconds_per_step
        record = logger.step(step, epoch=step // 20, loss=10.0 - step * 0.1, lr=0.1 * step)
        if record is not None:
            records.append(record)
    return records


def test_lines_speed_and_eta(tmp_path):
    clock, lines = FakeClock(), []
    log = tmp_path / "logs" / "train_log.jsonl"
    logger = ProgressLogger(35, 256, frequent=10, log_path=str(log), print_fn=lines.append, clock=clock)
    records = run_steps(logger, clock, 1, 35, 0.5, startup=5.0)
    assert [r["step"] for r in records] == [10, 20, 30, 35]          # every 10th and the last
    # step 10: 10 steps x 256 in 5 s start-up + 5 s; ETA from the mean since the start: 1 s/step x 25 steps
    assert (records[0]["samples_per_sec"], records[0]["eta_s"]) == (256.0, 25.0)
    # later: 10 x 256 in 5 s; ETA from the mean since the first line (0.5 s/step), start-up excluded
    assert (records[1]["samples_per_sec"], records[1]["eta_s"]) == (512.0, 7.5)
    assert (records[3]["samples_per_sec"], records[3]["eta_s"]) == (512.0, 0.0)
    assert lines[0] == "step 10/35  epoch 0  loss 9.0000  lr 1  256.0 samples/s  ETA 0:00:25"
    assert lines[1] == "step 20/35  epoch 1  loss 8.0000  lr 2  512.0 samples/s  ETA 0:00:08"
    logged = read_log(str(log))
    assert logged[0]["event"] == "start" and logged[0]["total_steps"] == 35 and logged[0]["batch_size_global"] == 256
    assert logged[1:] == records
    assert set(records[0]) == {"step", "epoch", "loss", "lr", "samples_per_sec", "eta_s", "time"}


def test_other_ranks_are_silent(tmp_path):
    lines = []
    log = tmp_path / "rank1.jsonl"
    logger = ProgressLogger(10, 64, frequent=1, log_path=str(log), rank=1, print_fn=lines.append)
    assert logger.step(1, 0, 1.0, 0.1) is None
    assert logger.log_eval(1, {"lfw": {"accuracy": 0.5}}) is None
    assert lines == [] and not log.exists()


def test_resumed_logger_counts_from_its_start_step(tmp_path):
    clock, lines = FakeClock(), []
    logger = ProgressLogger(100, 10, frequent=10, print_fn=lines.append, clock=clock, start_step=40)
    clock.now += 20.0
    record = logger.step(50, 2, 1.0, 0.01)
    assert (record["samples_per_sec"], record["eta_s"]) == (5.0, 100.0)      # 10 steps in 20 s, 50 left
    assert logger.step(55, 2, 1.0, 0.01) is None


def test_extras_numpy_values_and_non_finite_loss(tmp_path):
    lines = []
    log = tmp_path / "log.jsonl"
    logger = ProgressLogger(4, 8, frequent=2, log_path=str(log), print_fn=lines.append)
    record = logger.step(2, 0, np.float32("nan"), np.float64(0.5), grad_norm=np.float32(1.25), sampled=np.int64(7))
    assert record["loss"] is None and record["grad_norm"] == 1.25 and record["sampled"] == 7
    assert "loss nan" in lines[0] and lines[0].endswith("grad_norm 1.25  sampled 7")
    raw = log.read_text().splitlines()[-1]
    assert '"loss": null' in raw and json.loads(raw) == record


def test_log_eval(tmp_path):
    lines = []
    log = tmp_path / "log.jsonl"
    logger = ProgressLogger(10, 8, log_path=str(log), print_fn=lines.append)
    results = {"lfw": {"accuracy": np.float64(0.995), "accuracy_std": 0.003, "xnorm": np.float32(22.5)},
               "agedb_30": {"accuracy": 0.9}}
    record = logger.log_eval(2000, results)
    assert lines == ["step 2000  verification agedb_30: accuracy 0.90000",
                     "step 2000  verification lfw: accuracy 0.99500  accuracy_std 0.003  xnorm 22.5"]
    assert read_log(str(log))[-1] == record
    assert record["eval"]["lfw"] == {"accuracy": 0.995, "accuracy_std": 0.003, "xnorm": 22.5}
    with pytest.raises(ValueError, match="'cfp_fp' has no 'accuracy'"):
        logger.log_eval(2000, {"cfp_fp": {"acc": 0.9}})


def test_read_log_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_log(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="log.jsonl line 2 is not a JSON record"):
        read_log(str(path))


def test_current_history_drops_steps_redone_after_a_resume(tmp_path):
    log = str(tmp_path / "log.jsonl")
    first = ProgressLogger(40, 8, frequent=10, log_path=log, print_fn=lambda line: None)
    for step in (10, 20, 30):
        first.step(step, 0, 100.0 + step, 0.1)                 # crashed after step 30, last checkpoint at 20
    second = ProgressLogger(40, 8, frequent=10, log_path=log, start_step=20, print_fn=lambda line: None)
    second.log_eval(20, {"lfw": {"accuracy": 0.8}})
    for step in (30, 40):
        second.step(step, 0, 200.0 + step, 0.1)
    history = current_history(read_log(log))
    assert [(r["step"], r.get("loss")) for r in history] == [(10, 110.0), (20, 120.0), (20, None), (30, 230.0),
                                                             (40, 240.0)]


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 3725, 90000, -3)] == ["0:00:00", "0:01:00", "1:02:05",
                                                                        "25:00:00", "0:00:00"]
