"""Bad input to training never ends in a silent success or lost work: each case builds its input here and runs
recognition/train.py's own entry point (``main``) or the Trainer, with the tiny backbone of tests/conftest.py."""
import os
import pickle

import numpy as np
import pytest

from recognition.data import rec_format
from tests.harness import run_ranks
from tests.test_golden_runs import write_faces

pytestmark = pytest.mark.usefixtures("tiny_backbone")

PFC = ["--dataset", "synthetic", "--embedding-size", "16", "--batch-size", "4", "--lr", "0.1", "--frequent", "1",
       "--verbose", "0", "--checkpoint-every", "2", "--preprocess-threads", "1", "--val-targets", ""]


@pytest.fixture
def faces(tmp_path):
    folder = str(tmp_path / "faces")
    os.makedirs(folder)
    write_faces(folder)
    return folder


def _main(argv, capsys=None):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.train import main
    code = main(argv)
    return code, (capsys.readouterr().err if capsys is not None else "")


def _steps(out):
    root = os.path.join(str(out), "checkpoints")
    return sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []


def test_every_payload_not_an_image_stops_without_a_checkpoint(tmp_path, capsys):
    """Framing intact, every payload garbage: every record is skipped, every batch is padding, the loss is 0.
    The run must stop with the reason, write no checkpoint and exit non-zero."""
    data = str(tmp_path / "garbage")
    os.makedirs(data)
    with rec_format.RecordSetWriter(os.path.join(data, "train"), 10, (112, 112), ("iter",)) as writer:
        for k in range(60):
            writer.add(k % 10, b"not an image, record %d" % k)
    out = tmp_path / "run"
    code, err = _main(PFC + ["--data-dir", data, "--output", str(out), "--max-steps", "8"], capsys)
    assert code == 2 and "the loss has been exactly 0 for the first" in err
    assert _steps(out) == [] and not os.path.exists(out / "model-0001.params")


def test_a_non_finite_loss_stops_before_anything_is_saved(faces, tmp_path, capsys, monkeypatch):
    from recognition.partial_fc.method import PartialFCMethod
    real = PartialFCMethod.train_step

    def diverging(self, backbone, batch, lr, clock):
        loss = real(self, backbone, batch, lr, clock)
        return float("nan") if _steps(tmp_path / "run") else loss     # diverges after the first checkpoint
    monkeypatch.setattr(PartialFCMethod, "train_step", diverging)
    code, err = _main(PFC + ["--data-dir", faces, "--output", str(tmp_path / "run"), "--max-steps", "6"], capsys)
    assert code == 2 and "step 3: the loss is nan" in err
    assert _steps(tmp_path / "run") == ["step_000000002"]       # the one before the divergence, nothing after


def test_a_second_run_into_the_same_folder_is_refused_unless_resumed_or_overwritten(faces, tmp_path, capsys):
    out = tmp_path / "run"
    argv = PFC + ["--data-dir", faces, "--output", str(out)]
    assert _main(argv + ["--max-steps", "4"], capsys)[0] == 0
    assert _steps(out) == ["step_000000002", "step_000000004"]
    code, err = _main(argv + ["--max-steps", "2"], capsys)
    assert code == 2 and "holds another run (checkpoints, model-0001.params" in err and "--overwrite" in err
    assert _steps(out) == ["step_000000002", "step_000000004"]          # nothing of the earlier run touched
    code, err = _main(argv + ["--max-steps", "2", "--resume", "--overwrite"], capsys)
    assert code == 2 and "give one" in err
    assert _main(argv + ["--max-steps", "2", "--overwrite"], capsys)[0] == 0
    assert _steps(out) == ["step_000000002"] and not os.path.exists(out / "model-0002.params")


def _damage(folder, name, how):
    path = os.path.join(folder, name)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"\x00garbage{")


@pytest.mark.parametrize("name,how", [("backbone.params", "truncate"), ("optimizer.states", "truncate"),
                                      ("state.json", "garbage"), ("centres", "truncate")])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_newest_intact_one(faces, tmp_path, capsys, name, how):
    out = tmp_path / "run"
    argv = PFC + ["--data-dir", faces, "--output", str(out)]
    assert _main(argv + ["--max-steps", "4"], capsys)[0] == 0
    newest = out / "checkpoints" / "step_000000004"
    if name == "centres":
        name = sorted(n for n in os.listdir(newest) if n.startswith("centres_"))[0]
    _damage(str(newest), name, how)
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    trainer = Trainer(config_from_args(argv + ["--max-steps", "6", "--resume"]))
    try:
        assert trainer.resume() and trainer.step == 2           # step_000000004 is damaged: named and skipped
    finally:
        trainer.close()
    _damage(str(out / "checkpoints" / "step_000000002"), "backbone.params", "truncate")
    code, err = _main(argv + ["--max-steps", "6", "--resume"], capsys)
    assert code == 2 and "--resume: no intact checkpoint under" in err
    assert "step_000000004: " in err and name in err and "step_000000002: " in err and "backbone.params" in err


def test_a_damaged_verification_set_is_an_error_at_start_up(faces, tmp_path, capsys):
    with open(os.path.join(faces, "holdout.bin"), "wb") as f:
        pickle.dump(([b"\xff\xd8 not a jpeg"] * 4, [True, False]), f)
    code, err = _main(PFC[:-2] + ["--val-targets", "holdout", "--data-dir", faces, "--output",
                                  str(tmp_path / "run"), "--max-steps", "4"], capsys)
    assert code == 2 and "holdout.bin" in err
    assert not os.path.exists(tmp_path / "run" / "train_log.jsonl")          # no step was trained


def test_resume_with_another_embedding_size_is_one_clear_line(faces, tmp_path, capsys):
    out = tmp_path / "run"
    argv = PFC + ["--data-dir", faces, "--output", str(out)]
    assert _main(argv + ["--max-steps", "2"], capsys)[0] == 0
    code, err = _main([a if a != "16" else "32" for a in argv] + ["--max-steps", "4", "--resume"], capsys)
    assert code == 2 and "has embedding_size=16, this run 32" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_non_finite_learning_rate_is_refused(faces, value, capsys):
    code, err = _main(PFC + ["--data-dir", faces, "--lr", value], capsys)
    assert code == 2 and "lr must be > 0.0" in err


def damaged_rank_body(data, out):
    """Rank 1's half of the records is truncated away: it refuses the data, and every rank stops with its words."""
    from tests.conftest import patch_backbone
    patch_backbone()
    import horovod.mxnet as hvd
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    try:
        Trainer(config_from_args(PFC + ["--data-dir", data, "--output", out]))
    except (ValueError, OSError) as err:
        return hvd.rank(), str(err)
    return hvd.rank(), None


def test_a_rank_with_damaged_data_stops_every_rank_naming_the_file(faces, tmp_path):
    rec = os.path.join(faces, "train_iter.rec")
    _, offsets = rec_format.read_index(rec_format.index_path(rec))
    with open(rec, "r+b") as f:
        f.truncate(int(np.sort(offsets)[45]) + 10)        # records 45.. of 60: rank 1's share is damaged
    results = dict(run_ranks(damaged_rank_body, np=2, timeout=180,
                             kwargs={"data": faces, "out": str(tmp_path / "run")}))
    assert "records of rank 1" in results[1] and rec in results[1]
    assert "failed on host" in results[0] and "(rank 1): ValueError: " in results[0] and rec in results[0]
    assert not os.path.isdir(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")
