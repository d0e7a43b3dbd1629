"""tools/demo.sh takes every training setting from the method's demo preset (synthetic / synthetic_<method>)."""
import os
import subprocess

import pytest

from recognition.config import config_from_args
from recognition.data.rec_format import write_property
from recognition.methods import method_names
from tests.harness import ROOT

# the Partial FC demo's flags before its settings moved into the preset: `make demo` must train the same run
FORMER_PFC_FLAGS = ["--batch-size", "32", "--num-epochs", "1", "--lr", "0.2", "--warmup-epochs", "0.1",
                    "--preprocess-threads", "1", "--frequent", "10", "--verbose", "47", "--checkpoint-every", "47"]


def demo_preset(method):
    return "synthetic" if method == "pfc" else "synthetic_" + method


@pytest.fixture
def data(tmp_path):
    write_property(str(tmp_path / "property"), 300, (112, 112))
    return str(tmp_path)


def _demo_config(method, data, extra=()):
    return config_from_args(["--dataset", demo_preset(method), "--method", method, "--data-dir", data,
                             "--output", os.path.join(data, "out")] + list(extra))


@pytest.mark.parametrize("method", method_names())
def test_every_method_has_a_demo_preset(method, data):
    cfg = _demo_config(method, data)
    assert cfg.method == method and cfg.val_targets == ("holdout",)
    assert cfg.network == "mbf" and cfg.preprocess_threads == 1


def test_the_partial_fc_demo_is_unchanged(data):
    assert dict(_demo_config("pfc", data)) == dict(_demo_config("pfc", data, FORMER_PFC_FLAGS))


def test_demo_refuses_a_method_without_a_preset(tmp_path):
    env = dict(os.environ, METHOD="nosuch", DEMO_OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", "tools/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "METHOD=nosuch has no demo preset recognition/configs/synthetic_nosuch.py" in done.stderr
    assert not (tmp_path / "out").exists()
