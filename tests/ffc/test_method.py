"""FFC as a training method: batch composition, the step (EMA, sides A and B, accumulated gradients), exact
resume (K + resume + K = 2K steps), resume on another world size, checkpoints.

The backbone is the tiny conv net of tests/conftest.py; the data a small packed synthetic-identities set.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.harness import ROOT, run_ranks

# in this process through monkeypatch (restored after each test); rank processes patch in train_body
pytestmark = pytest.mark.usefixtures("tiny_backbone")

FLAGS = ["--dataset", "synthetic_ffc", "--embedding-size", "16", "--batch-size", "4", "--queue-size", "6",
         "--lr", "0.2", "--num-epochs", "2", "--frequent", "1", "--verbose", "0", "--checkpoint-every", "3",
         "--preprocess-threads", "1"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """12 identities x 8 images, packed (tools/make_synthetic.py), with holdout.bin."""
    folder = tmp_path_factory.mktemp("ffc_faces")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"), str(folder), "--identities",
                    "12", "--images", "8", "--holdout", "6", "--pairs", "40", "--workers", "1"],
                   check=True, cwd=ROOT, capture_output=True)
    return str(folder)


def _argv(data, out, *extra):
    return FLAGS + ["--data-dir", data, "--output", str(out)] + list(extra)


def _trainer(argv):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    return Trainer(config_from_args(argv))


def _snapshot(trainer):
    arg, _ = trainer.backbone.get_params()
    gallery, _ = trainer.method.gallery.get_params()
    return {"arg": {k: v.asnumpy() for k, v in arg.items()}, "gallery": {k: v.asnumpy() for k, v in gallery.items()},
            "queue": trainer.method.queue.state_dict()}


def train_body(argv, probe_resume=False):
    """Train with ``argv``; return the probe and gallery parameters, the queue, the loss and the step."""
    import horovod.mxnet as hvd
    from tests.conftest import patch_backbone
    patch_backbone()
    trainer = _trainer(argv)
    loaded = None
    if probe_resume:
        trainer.resume()
        loaded = _snapshot(trainer)
    loss = trainer.fit()
    return dict(_snapshot(trainer), rank=hvd.rank(), loss=loss, step=trainer.step, loaded=loaded)


def _assert_same(a, b):
    for part in ("arg", "gallery"):
        for name in a[part]:
            np.testing.assert_array_equal(a[part][name], b[part][name], err_msg="%s %s" % (part, name))
    for key in a["queue"]:
        np.testing.assert_array_equal(a["queue"][key], b["queue"][key], err_msg="queue " + key)


def test_pair_batches_compose_the_two_sides():
    import mxnet as mx
    from recognition.data.id_loader import IdBatch
    from recognition.data.record_reader import Batch
    from recognition.ffc.method import pair_batches
    rng = np.random.default_rng(0)
    a, b, inst = (rng.uniform(0, 255, (n, 3, 112, 112)).astype(np.float32) for n in (4, 4, 4))
    ids, labels = np.array([7, 3, 9, 1]), np.array([5, 6, 7, 8])
    out = pair_batches(IdBatch(mx.nd.array(a), mx.nd.array(b), ids, np.zeros((4, 2))),
                       Batch(mx.nd.array(inst), labels, 0))
    np.testing.assert_array_equal(out.x.asnumpy(), np.concatenate([a, inst[:2]]))
    np.testing.assert_array_equal(out.y.asnumpy(), np.concatenate([b, inst[2:]]))
    np.testing.assert_array_equal(out.x_label, [7, 3, 9, 1, 5, 6])
    np.testing.assert_array_equal(out.y_label, [7, 3, 9, 1, 7, 8])
    assert out.x_label.dtype == np.int64


def test_one_step_runs_ema_then_side_a_undone_then_side_b_kept(tmp_path, faces):
    """Spies on the queue: side A scores x against gallery(y) and is not kept, side B scores y against
    gallery(x) and is kept; the gallery moved by exactly one EMA step before its forwards; the backbone's
    update used the SUM of both sides' gradients (grad_req 'add')."""
    import mxnet as mx
    trainer = _trainer(_argv(faces, tmp_path / "run", "--ffc-alpha", "0.75"))
    method, backbone = trainer.method, trainer.backbone
    gallery_before, _ = method.gallery.get_params()
    gallery_before = {k: v.asnumpy() for k, v in gallery_before.items()}
    probe_before = {k: v.asnumpy() for k, v in backbone.get_params()[0].items()}
    calls, grads = [], []
    real_fb, real_backward = method.queue.forward_backward, backbone.backward

    def spy_fb(probe, probe_labels, gallery, gallery_labels, keep=True):
        calls.append({"probe": probe.asnumpy(), "probe_labels": np.array(probe_labels),
                      "gallery": gallery.asnumpy(), "gallery_labels": np.array(gallery_labels), "keep": keep,
                      "state": method.queue.state_dict()})
        return real_fb(probe, probe_labels, gallery, gallery_labels, keep=keep)

    def spy_backward(grad):
        grads.append(grad.asnumpy())
        return real_backward(grad)
    method.queue.forward_backward, backbone.backward = spy_fb, spy_backward
    batch = next(iter(method.batches(0)))
    loss = trainer.train_step(batch)
    assert np.isfinite(loss) and loss > 0
    assert [c["keep"] for c in calls] == [False, True]
    np.testing.assert_array_equal(calls[0]["probe_labels"], batch.x_label)
    np.testing.assert_array_equal(calls[0]["gallery_labels"], batch.y_label)
    np.testing.assert_array_equal(calls[1]["probe_labels"], batch.y_label)
    np.testing.assert_array_equal(calls[1]["gallery_labels"], batch.x_label)
    for key, value in calls[0]["state"].items():          # side A changed nothing that side B saw
        np.testing.assert_array_equal(calls[1]["state"][key], value)
    after = method.queue.state_dict()
    assert set(map(int, after["slots"][:, 0])) >= set(map(int, batch.x_label[-6:]))   # side B's labels kept
    only_side_a = set(map(int, batch.y_label[4:])) - set(map(int, batch.x_label))
    assert not only_side_a & set(map(int, after["slots"][:, 0]))     # the queue was empty before this step

    # the gallery moved one EMA step towards the probe as it was before the update
    gallery_after = {k: v.asnumpy() for k, v in method.gallery.get_params()[0].items()}
    for name, g in gallery_before.items():
        expected = np.float32(0.75) * g + np.float32(0.25) * probe_before[name]
        np.testing.assert_allclose(gallery_after[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)

    # the gallery features of side A are the EMA'd gallery's training-mode embeddings of y
    fresh = mx.mod.Module(backbone.symbol, data_names=["data"], label_names=None)
    fresh.bind(data_shapes=[("data", batch.y.shape)], for_training=True)
    fresh.init_params(arg_params={k: mx.nd.array(v) for k, v in gallery_after.items()},
                      aux_params=method.gallery.get_params()[1])
    fresh.forward(mx.io.DataBatch([batch.y]), is_train=True)
    np.testing.assert_allclose(calls[0]["gallery"], fresh.get_outputs()[0].asnumpy(), rtol=1e-4, atol=1e-5)
    assert len(grads) == 2 and np.abs(grads[0]).sum() > 0 and np.abs(grads[1]).sum() > 0


def test_gallery_follows_every_ema_step_in_training_mode():
    """After several EMA steps the gallery's output is a training-mode forward (batch statistics) of its current
    weights: no weights cached from an earlier forward, no BatchNorm folded with moving statistics."""
    import mxnet as mx
    from recognition.ffc.gallery import GalleryNet
    from tests.conftest import tiny_symbol
    symbol = tiny_symbol("tiny", embedding_size=8)
    rng = np.random.default_rng(2)
    shapes = dict(zip(symbol.list_arguments(), symbol.infer_shape(data=(4, 3, 112, 112))[0]))
    arg = {n: mx.nd.array(rng.standard_normal(shapes[n]) * 0.1) for n in shapes if n != "data"}
    aux_shapes = dict(zip(symbol.list_auxiliary_states(), symbol.infer_shape(data=(4, 3, 112, 112))[2]))
    aux = {n: mx.nd.array(rng.uniform(0.5, 2.0, aux_shapes[n])) for n in aux_shapes}     # not batch statistics
    gallery = GalleryNet(symbol, mx.cpu(), 4, arg, aux)
    x = mx.nd.array(rng.uniform(0, 255, (4, 3, 112, 112)))
    expected = {k: v.asnumpy() for k, v in arg.items()}
    for alpha in (0.5, 0.9):
        gallery.embed(x).wait_to_read()
        probe = {n: mx.nd.array(rng.standard_normal(shapes[n]) * 0.1) for n in arg}
        gallery.follow(probe, alpha)
        expected = {k: np.float32(alpha) * v + np.float32(1 - alpha) * probe[k].asnumpy() for k, v in expected.items()}
    weights, aux_now = gallery.get_params()
    for name, value in expected.items():
        if name.endswith("_gamma"):          # fix_gamma BatchNorm: the forward itself pins gamma to 1
            continue
        np.testing.assert_allclose(weights[name].asnumpy(), value, rtol=1e-6, atol=1e-7, err_msg=name)
    out = gallery.embed(x).asnumpy()
    reference = mx.mod.Module(symbol, data_names=["data"], label_names=None)
    reference.bind(data_shapes=[("data", x.shape)], for_training=True)
    reference.init_params(arg_params={k: mx.nd.array(v) for k, v in expected.items()}, aux_params=aux_now)
    reference.forward(mx.io.DataBatch([x]), is_train=True)
    np.testing.assert_allclose(out, reference.get_outputs()[0].asnumpy(), rtol=1e-5, atol=1e-5)
    reference.forward(mx.io.DataBatch([x]), is_train=False)           # moving statistics: another function
    assert np.abs(out - reference.get_outputs()[0].asnumpy()).max() > 1e-2


def test_backbone_accumulates_two_backward_passes(tmp_path):
    """grad_req 'add': the gradient after backward(x1, g1) and backward(x2, g2) is the sum of each alone."""
    import mxnet as mx
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.backbone import Backbone
    from recognition.config import config_from_args
    cfg = config_from_args(["--dataset", "bench_1m", "--embedding-size", "8", "--output", str(tmp_path)])
    rng = np.random.default_rng(1)
    x1, x2 = (mx.nd.array(rng.uniform(0, 255, (6, 3, 112, 112))) for _ in range(2))
    g1, g2 = (mx.nd.array(rng.standard_normal((6, 8))) for _ in range(2))
    summed = Backbone(cfg, mx.cpu(), 6, accumulate=True)
    alone = Backbone(cfg, mx.cpu(), 6)
    summed.forward(x1)
    summed.backward(g1)
    summed.forward(x2)
    summed.backward(g2)
    total = [g.asnumpy() for g in summed._grads()]
    parts = []
    for x, g in ((x1, g1), (x2, g2)):
        alone.forward(x)
        alone.backward(g)
        parts.append([a.asnumpy() for a in alone._grads()])
    assert len(total) == len(parts[0]) > 0
    for t, p, q in zip(total, parts[0], parts[1]):
        np.testing.assert_allclose(t, p + q, rtol=1e-4, atol=1e-5)
    summed.update(0.1)
    assert all(not np.any(g.asnumpy()) for g in summed._grads())       # cleared for the next step


def test_k_steps_plus_resume_plus_k_steps_equals_2k_steps(tmp_path, faces):
    straight = run_ranks(train_body, np=2, timeout=300, kwargs={"argv": _argv(faces, tmp_path / "a", "--max-steps",
                                                                              "6")})
    run_ranks(train_body, np=2, timeout=300, kwargs={"argv": _argv(faces, tmp_path / "b", "--max-steps", "3")})
    resumed = run_ranks(train_body, np=2, timeout=300,
                        kwargs={"argv": _argv(faces, tmp_path / "b", "--max-steps", "6", "--resume")})
    assert straight[0]["step"] == resumed[0]["step"] == 6
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"]
        _assert_same(a, b)
    _assert_same(straight[0], straight[1])                   # every rank holds the same probe, gallery, queue
    state = json.load(open(os.path.join(str(tmp_path / "b"), "checkpoints", "step_000000003", "state.json")))
    assert state["method"] == "ffc"
    # 96 images on 2 ranks of 4: 12 steps an epoch; 12 identities, 8 a global step: 1 step an id pass
    assert state["data_position"] == {"epoch": 0, "step_in_epoch": 3, "id_pass": 3, "id_step": 0}


def test_resume_on_another_world_size_loads_the_queue_and_gallery(tmp_path, faces):
    out = tmp_path / "run"
    before = run_ranks(train_body, np=2, timeout=300, kwargs={"argv": _argv(faces, out, "--max-steps", "3")})
    after = run_ranks(train_body, np=3, timeout=300,
                      kwargs={"argv": _argv(faces, out, "--max-steps", "5", "--resume"), "probe_resume": True})
    for result in after:
        _assert_same(before[0], result["loaded"])
        assert result["step"] == 5 and np.isfinite(result["loss"])
    _assert_same(after[0], after[2])


def test_a_pfc_checkpoint_does_not_resume_an_ffc_run(tmp_path, faces):
    out = tmp_path / "run"
    pfc = _trainer(["--dataset", "synthetic", "--data-dir", faces, "--output", str(out), "--embedding-size", "16",
                    "--batch-size", "4", "--max-steps", "1", "--verbose", "0", "--preprocess-threads", "1"])
    pfc.fit()
    ffc = _trainer(_argv(faces, out, "--max-steps", "2", "--resume"))
    with pytest.raises(ValueError, match="method='pfc', this run 'ffc'"):
        ffc.resume()
