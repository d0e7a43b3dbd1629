"""Tools refuse bad arguments with one line naming the value, before any work, and without a traceback."""
import subprocess
import sys

import pytest

from tests.harness import ROOT

CASES = [
    (["tools/count_flops.py", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["tools/count_flops.py", "--iters", "0"], "argument --iters: must be >= 1, got 0"),
    (["tools/benchmark_data.py", "--data-dir", "/no/such/folder"], "--data-dir /no/such/folder is not a folder"),
    (["tools/benchmark_id_loader.py", "/no/such/folder"], "data folder /no/such/folder is not a folder"),
    (["tools/make_synthetic_ijb.py", "OUT", "--first-identity", "1", "--quality", "500"], "--quality must be 1-100"),
    (["tools/make_synthetic_ijb.py", "OUT", "--first-identity", "1", "--media", "0"], "--media must be >= 1"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_argument_is_one_line(tmp_path, argv, message):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    done = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
