"""tools/plot_log.py: the series it reads from a real ProgressLogger log, the PNG it writes, its errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from recognition.progress import ProgressLogger
from tests.harness import ROOT
from tools import plot_log

# matplotlib 3.9 calls pyparsing names that pyparsing 3.3 deprecates (not this project's code)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:matplotlib.*")


def write_log(path, resume=False):
    quiet = dict(print_fn=lambda line: None)
    logger = ProgressLogger(60, 32, frequent=10, log_path=path, **quiet)
    for step in range(10, 61, 10):
        logger.step(step, step // 30, 20.0 - step / 10.0, 0.1 * (1 - step / 60.0))
        if step % 30 == 0:
            logger.log_eval(step, {"lfw": {"accuracy": 0.5 + step / 200.0}, "holdout": {"accuracy": step / 100.0}})
    if resume:      # resumed from the checkpoint at step 30: steps 40-60 are done again, with other losses
        again = ProgressLogger(60, 32, frequent=10, log_path=path, start_step=30, **quiet)
        for step in (40, 50, 60):
            again.step(step, 1, 1.0, 0.01)


def test_load_series_reads_the_logged_values(tmp_path):
    path = str(tmp_path / "train_log.jsonl")
    write_log(path)
    series = plot_log.load_series(path)
    np.testing.assert_array_equal(series["step"], [10, 20, 30, 40, 50, 60])
    np.testing.assert_allclose(series["loss"], [19, 18, 17, 16, 15, 14])
    np.testing.assert_allclose(series["lr"], 0.1 * (1 - np.arange(10, 61, 10) / 60.0))
    assert sorted(series["eval"]) == ["holdout", "lfw"]
    np.testing.assert_array_equal(series["eval"]["lfw"][0], [30, 60])
    np.testing.assert_allclose(series["eval"]["lfw"][1], [0.65, 0.8])


def test_load_series_keeps_the_resumed_run(tmp_path):
    path = str(tmp_path / "train_log.jsonl")
    write_log(path, resume=True)
    series = plot_log.load_series(path)
    np.testing.assert_array_equal(series["step"], [10, 20, 30, 40, 50, 60])
    np.testing.assert_allclose(series["loss"], [19, 18, 17, 1, 1, 1])
    np.testing.assert_array_equal(series["eval"]["lfw"][0], [30])     # step 60 was verified in the abandoned part


def test_main_writes_a_png(tmp_path, capsys):
    import matplotlib.image
    log, out = str(tmp_path / "train_log.jsonl"), str(tmp_path / "plots" / "training.png")
    write_log(log)
    assert plot_log.main([log, out, "--title", "synthetic mbf"]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (640, 800)          # two panels: loss / lr and verification accuracy
    assert "6 training points, 2 verification set(s)" in capsys.readouterr().out
    assert os.listdir(os.path.dirname(out)) == ["training.png"]      # no temporary file left


def test_errors_for_missing_or_empty_logs(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    assert plot_log.main([missing, str(tmp_path / "x.png")]) == 1
    assert "no such log file: %s" % missing in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_log.main([str(empty), str(tmp_path / "x.png")]) == 1
    assert "holds no training records" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "file").write_text("")
    assert plot_log.main([missing, str(tmp_path / "file" / "x.png")]) == 1       # the output is checked first
    err = capsys.readouterr().err
    assert "plot_log: error: OUT %s: %s is a file" % (tmp_path / "file" / "x.png", tmp_path / "file") in err
    assert "Traceback" not in err


def test_command_line_from_the_repository_root(tmp_path):
    proc = subprocess.run([sys.executable, "tools/plot_log.py", str(tmp_path / "nope.jsonl"), "out.png"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("plot_log: error: no such log file")


def test_compare_draws_several_runs_against_wall_time(tmp_path, capsys):
    import matplotlib.image
    first, second, out = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "both.png")
    write_log(first)
    write_log(second)
    series = plot_log.load_series(first)
    assert np.all(np.diff(series["time"]) >= 0) and series["eval_time"]["lfw"].shape == (2,)
    assert plot_log.main(["--compare", "pfc=" + first, "ffc=" + second, out]) == 0
    assert matplotlib.image.imread(out).shape[:2] == (640, 800)
    assert "2 runs" in capsys.readouterr().out
    assert plot_log.main(["--compare", first, out]) == 1                      # no LABEL=
    assert "LABEL=LOG" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_log.main([first, second, out])                                  # three paths without --compare
