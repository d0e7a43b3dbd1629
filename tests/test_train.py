"""The training loop: exact resume, resume on another world size, checkpoints, legacy export, signals, errors.

The backbone here is the tiny conv net of tests/conftest.py (``tiny_backbone`` / ``patch_backbone``).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import patch_backbone, tiny_train_argv
from tests.harness import ROOT, horovodrun_path, run_ranks


def train_body(argv, resume_probe=False):
    """Train with ``argv``; return what the checks compare (params, centres of this rank, last loss, step)."""
    import horovod.mxnet as hvd
    patch_backbone()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    trainer = Trainer(config_from_args(argv))
    probe = None
    if resume_probe:   # centres right after loading, before any new step
        trainer.resume()
        probe = (trainer.method.head.pfc.class_start, trainer.method.head.pfc.weight.copy(), trainer.step)
    loss = trainer.fit()
    arg, aux = trainer.module.get_params()
    pfc = trainer.method.head.pfc
    return {"rank": hvd.rank(), "loss": loss, "step": trainer.step,
            "arg": {k: v.asnumpy() for k, v in arg.items()}, "class_start": pfc.class_start,
            "weight": pfc.weight.copy(), "momentum": pfc.weight_mom.copy(), "probe": probe}


@pytest.mark.parametrize("ratio", ["1.0", "0.1"])
def test_k_steps_plus_resume_plus_k_steps_equals_2k_steps(tmp_path, ratio):
    straight = run_ranks(train_body, np=2, timeout=240,
                         kwargs={"argv": tiny_train_argv(tmp_path / "a", "--sample-ratio", ratio, "--max-steps", "6")})
    first = run_ranks(train_body, np=2, timeout=240,
                      kwargs={"argv": tiny_train_argv(tmp_path / "b", "--sample-ratio", ratio, "--max-steps", "3")})
    resumed = run_ranks(train_body, np=2, timeout=240,
                        kwargs={"argv": tiny_train_argv(tmp_path / "b", "--sample-ratio", ratio, "--max-steps", "6",
                                              "--resume")})
    assert first[0]["step"] == 3 and resumed[0]["step"] == 6 == straight[0]["step"]
    assert first[0]["loss"] != straight[0]["loss"]
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"]
        for name in a["arg"]:
            np.testing.assert_array_equal(a["arg"][name], b["arg"][name], err_msg=name)
        np.testing.assert_array_equal(a["weight"], b["weight"])
        np.testing.assert_array_equal(a["momentum"], b["momentum"])
    # every rank holds the same backbone (gradients are summed over ranks)
    for name in straight[0]["arg"]:
        np.testing.assert_array_equal(straight[0]["arg"][name], straight[1]["arg"][name])


def _centres(results, key="weight"):
    ordered = sorted(results, key=lambda r: r["class_start"])
    return np.concatenate([r[key] for r in ordered])


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 3), (3, 2)])
def test_resume_on_a_different_world_size_keeps_every_class(tmp_path, saved_on, resumed_on):
    out = tmp_path / "run"
    before = run_ranks(train_body, np=saved_on, timeout=240,
                       kwargs={"argv": tiny_train_argv(out, "--sample-ratio", "0.3", "--max-steps", "3")})
    after = run_ranks(train_body, np=resumed_on, timeout=240,
                      kwargs={"argv": tiny_train_argv(out, "--sample-ratio", "0.3", "--max-steps", "5", "--resume"),
                              "resume_probe": True})
    saved = _centres(before)
    assert saved.shape == (203, 16)
    probes = sorted((r["probe"] for r in after), key=lambda probe: probe[0])
    loaded = np.concatenate([weight for _, weight, _ in probes])
    np.testing.assert_array_equal(loaded, saved)
    assert all(r["probe"][2] == 3 for r in after) and after[0]["step"] == 5
    assert np.isfinite(after[0]["loss"])


def test_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_backbone):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition import checkpoint_io
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    out = tmp_path / "run"
    trainer = Trainer(config_from_args(tiny_train_argv(out, "--max-steps", "3")))
    trainer.fit()
    good = checkpoint_io.latest_complete(os.path.join(str(out), "checkpoints"), "step_*")
    assert good.endswith("step_000000003")

    def dying_save(folder):
        with open(os.path.join(folder, "centres_partial.npy"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed while writing the centres")

    trainer.method.save = dying_save
    trainer.step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert checkpoint_io.latest_complete(os.path.join(str(out), "checkpoints"), "step_*") == good
    fresh = Trainer(config_from_args(tiny_train_argv(out, "--max-steps", "3", "--resume")))
    assert fresh.resume() and fresh.step == 3


def test_legacy_export_gives_the_trainers_embeddings(tmp_path, tiny_backbone):
    import mxnet as mx
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    out = tmp_path / "run"
    trainer = Trainer(config_from_args(tiny_train_argv(out, "--max-steps", "3")))
    trainer.fit()
    images = np.random.default_rng(0).uniform(0, 255, (4, 3, 112, 112)).astype(np.float32)
    trainer.module.forward(mx.io.DataBatch([mx.nd.array(images)]), is_train=False)
    expected = trainer.module.get_outputs()[0].asnumpy()
    assert os.path.exists(os.path.join(str(out), "model-symbol.json"))
    sym, arg, aux = mx.model.load_checkpoint(os.path.join(str(out), "model"), 1)
    assert sym.list_outputs() == ["fc1_output"]
    legacy = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    legacy.bind(data_shapes=[("data", images.shape)], for_training=False)
    legacy.set_params(arg, aux)
    legacy.forward(mx.io.DataBatch([mx.nd.array(images)]), is_train=False)
    # same numbers up to float32 rounding (the inference graph is fused differently by oneDNN)
    np.testing.assert_allclose(legacy.get_outputs()[0].asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_padding_rows_are_left_out_of_the_loss(tmp_path, tiny_backbone):
    """Rows a reader flags as padding reach the head labelled IGNORE_LABEL and send back no gradient."""
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.data.record_reader import Batch
    from recognition.partial_fc.operator import IGNORE_LABEL
    from recognition.trainer import Trainer
    trainer = Trainer(config_from_args(tiny_train_argv(tmp_path / "run", "--max-steps", "3")))
    seen = []
    real_forward_backward = trainer.method.head.forward_backward

    def spy(embeddings, labels):
        loss, grad = real_forward_backward(embeddings, labels)
        seen.append((np.array(labels), grad.asnumpy()))
        return loss, grad
    trainer.method.head.forward_backward = spy
    batch = next(iter(trainer.method.reader.epoch(0)))
    labels = batch.label.copy()
    loss = trainer.train_step(Batch(batch.data, batch.label, 2))
    np.testing.assert_array_equal(batch.label, labels)                    # the reader's batch is not modified
    sent, grad = seen[0]
    np.testing.assert_array_equal(sent, np.concatenate([labels[:-2], [IGNORE_LABEL] * 2]))
    assert not np.any(grad[-2:]) and np.all(np.abs(grad[:-2]).sum(axis=1) > 0)
    assert np.isfinite(loss) and loss > 0


@pytest.fixture(scope="module")
def tiny_faces(tmp_path_factory):
    """A small packed synthetic-identities set with its holdout.bin (tools/make_synthetic.py)."""
    folder = tmp_path_factory.mktemp("faces")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"), str(folder), "--identities",
                    "12", "--images", "8", "--holdout", "6", "--pairs", "40", "--workers", "1"],
                   check=True, cwd=ROOT, capture_output=True)
    return str(folder)


def test_short_multi_rank_run_lowers_the_loss_and_verifies(tmp_path, tiny_faces):
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--data-dir", tiny_faces, "--network", "mbf", "--embedding-size", "16",
            "--batch-size", "4", "--sample-ratio", "0.5", "--lr", "0.5", "--num-epochs", "4", "--frequent", "1",
            "--verbose", "10", "--checkpoint-every", "12", "--keep-exports", "2", "--output", str(out)]
    results = run_ranks(train_body, np=2, timeout=240, kwargs={"argv": argv})
    assert results[0]["step"] == 4 * (12 * 8 // 8)          # 96 images, global batch 8: 12 steps an epoch
    records = [json.loads(line) for line in open(os.path.join(str(out), "train_log.jsonl"))]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 48
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses
    evals = [r["eval"]["holdout"] for r in records if "eval" in r]
    assert len(evals) == 5 and all(0.0 <= e["accuracy"] <= 1.0 for e in evals)
    best = json.load(open(os.path.join(str(out), "best.json")))
    assert best["mean_accuracy"] == max(e["accuracy"] for e in evals)
    assert os.path.exists(os.path.join(str(out), "best-0000.params"))
    # four exports (steps 12 ... 48), the newest two kept, and the best-verifying weights
    assert sorted(f for f in os.listdir(str(out)) if f.endswith(".params")) == [
        "best-0000.params", "model-0003.params", "model-0004.params"]


def test_only_the_newest_exports_are_kept(tmp_path, tiny_backbone):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    out = tmp_path / "run"
    trainer = Trainer(config_from_args(tiny_train_argv(out, "--max-steps", "5", "--checkpoint-every", "1",
                                                       "--keep-exports", "2")))
    for name in ("best-0000.params", "model-0001.params.tmp", "notes-0001.params"):   # not exports of this run
        (out / name).write_bytes(b"x")
    trainer.fit()
    assert sorted(os.listdir(str(out))) == ["best-0000.params", "checkpoints", "model-0001.params.tmp",
                                            "model-0004.params", "model-0005.params", "model-symbol.json",
                                            "notes-0001.params", "train_log.jsonl"]
    every = tmp_path / "every"
    Trainer(config_from_args(tiny_train_argv(every, "--max-steps", "4", "--checkpoint-every", "1", "--keep-exports",
                                   "0"))).fit()
    assert sorted(f for f in os.listdir(str(every)) if f.endswith(".params")) == [
        "model-%04d.params" % i for i in range(1, 5)]
    # a last step between two checkpoints exports under the next number, next to the previous export
    between = tmp_path / "between"
    Trainer(config_from_args(tiny_train_argv(between, "--max-steps", "5", "--checkpoint-every", "2",
                                             "--keep-exports", "0"))).fit()
    assert sorted(f for f in os.listdir(str(between)) if f.endswith(".params")) == [
        "model-%04d.params" % i for i in range(1, 4)]


def test_the_device_is_the_gpu_when_mxnet_sees_one(monkeypatch):
    import mxnet as mx
    from recognition.trainer import choose_context
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 0)
    assert choose_context("auto", 0)[0] == mx.cpu() and "sees no GPU" in choose_context("auto", 0)[1]
    with pytest.raises(ValueError, match="--ctx gpu, but MXNet sees no GPU"):
        choose_context("gpu", 0)
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 8)
    assert choose_context("auto", 3)[0] == mx.gpu(3) and choose_context("gpu", 7)[0] == mx.gpu(7)
    assert choose_context("cpu", 3)[0] == mx.cpu()
    with pytest.raises(ValueError, match="local rank 8 has no GPU of its own: MXNet sees 8 GPU"):
        choose_context("auto", 8)


def test_auto_trains_on_this_cpu_machine_and_says_so(tmp_path, tiny_backbone, caplog):
    import mxnet as mx
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    assert mx.context.num_gpus() == 0           # the test machine: the GPU path itself cannot run here
    caplog.set_level("INFO", logger="recognition.train")
    cfg = config_from_args(tiny_train_argv(tmp_path / "run", "--max-steps", "1"))
    assert cfg.ctx == "auto"
    trainer = Trainer(cfg)
    assert trainer.ctx == mx.cpu() and trainer.backbone.ctx == mx.cpu()
    assert "device: cpu(0) on rank 0 (auto: MXNet sees no GPU)" in caplog.text


def _launch(argv, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [horovodrun_path(), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
           os.path.join(ROOT, "tests", "train_tiny.py")] + argv
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(os.path.join(str(out), "out.log"), "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    os.makedirs(str(out))
    proc = _launch(tiny_train_argv(out, "--max-steps", "100000", "--checkpoint-every", "100000"), out)
    try:
        log_path = os.path.join(str(out), "train_log.jsonl")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(log_path) and os.path.getsize(log_path) > 200):
            time.sleep(0.5)
        ranks = subprocess.run(["pgrep", "-f", "tests/train_tiny.py"], capture_output=True, text=True).stdout.split()
        workers = [int(p) for p in ranks if int(p) != proc.pid]
        assert workers, "no training process found"
        os.kill(max(workers), signal.SIGTERM)          # one rank only
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = open(os.path.join(str(out), "out.log")).read()
    assert rc != 0, output
    assert "stopping at step" in output and "signal 15" in output, output
    from recognition import checkpoint_io
    saved = checkpoint_io.latest_complete(os.path.join(str(out), "checkpoints"), "step_*")
    assert saved is not None, output
    state = json.load(open(os.path.join(saved, "state.json")))
    assert state["step"] >= 1


def test_bad_preset_network_and_missing_data_are_clear_errors(tmp_path, capsys):
    from recognition.train import main
    assert main(["--dataset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset preset 'nope'" in err and "glint360k" in err
    assert main(["--dataset", "bench_1m", "--network", "r42"]) == 2
    assert "r18" in capsys.readouterr().err
    assert main(["--dataset", "synthetic", "--data-dir", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
