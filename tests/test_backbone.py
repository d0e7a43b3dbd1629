"""The backbone's parameters as checkpoints and verification read them: the BatchNorm moving statistics of every
step are in, however far MXNet's asynchronous engine has got with that step's backward pass, and a verification
changes nothing that is saved or trained.

MXNet's CPU BatchNorm updates its moving statistics in the backward pass, in arrays the engine does not see that
op write. Without a wait, a read right after a step sees some layers before the update and some after: which ones
depends on timing (the tiny backbone's backward pass is quick: ``slow_backward`` holds part of it back).
"""
import os
import pickle
import time

import numpy as np
import pytest

from tests.conftest import tiny_train_argv

DELAY = 0.3     # seconds the backward pass of the first BatchNorm is held back


def _register_slow_identity():
    """MXNet custom operator ``test_slow_identity``: the identity, whose backward pass sleeps DELAY seconds on
    MXNet's custom-operator thread (asynchronously to Python)."""
    import mxnet as mx
    if _register_slow_identity.done:
        return

    class SlowIdentity(mx.operator.CustomOp):
        def forward(self, is_train, req, in_data, out_data, aux):
            self.assign(out_data[0], req[0], in_data[0])

        def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
            time.sleep(DELAY)
            self.assign(in_grad[0], req[0], out_grad[0])

    @mx.operator.register("test_slow_identity")
    class SlowIdentityProp(mx.operator.CustomOpProp):
        def __init__(self):
            super().__init__(need_top_grad=True)

        def infer_shape(self, in_shape):
            return in_shape, [in_shape[0]], []

        def create_operator(self, ctx, shapes, dtypes):
            return SlowIdentity()
    _register_slow_identity.done = True


_register_slow_identity.done = False


def slow_tiny_symbol(name, embedding_size=512, **unused):
    """The tiny backbone with the slow identity above its first BatchNorm: that layer's backward pass (where
    its moving statistics are updated) runs DELAY seconds after the rest, when the step has long returned."""
    import mxnet as mx
    x = (mx.sym.Variable("data") - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=8, kernel=(4, 4), stride=(4, 4), no_bias=True, name="conv1")
    x = mx.sym.relu(mx.sym.BatchNorm(x, name="bn1"))
    x = mx.sym.Custom(x, op_type="test_slow_identity", name="slow")
    x = mx.sym.Convolution(x, num_filter=8, kernel=(4, 4), stride=(4, 4), no_bias=True, name="conv2")
    x = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=embedding_size, name="pre_fc1")
    return mx.sym.BatchNorm(x, fix_gamma=True, name="fc1")


@pytest.fixture
def slow_backward(monkeypatch):
    import symbols
    _register_slow_identity()
    monkeypatch.setattr(symbols, "get_symbol", slow_tiny_symbol)


def _live_aux(module):
    """The executor's moving statistics once the engine is idle."""
    import mxnet as mx
    mx.nd.waitall()
    group = module._exec_group
    return {name: arrays[0].asnumpy() for name, arrays in zip(group.aux_names, group.aux_arrays)}


def test_get_params_holds_the_last_steps_batchnorm_update(tmp_path, slow_backward):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    trainer = Trainer(config_from_args(tiny_train_argv(tmp_path / "run", "--max-steps", "2", "--val-targets", "")))
    try:
        batches = trainer.method.batches(0)
        before = _live_aux(trainer.module)
        trainer.train_step(next(batches))
        _, aux = trainer.backbone.get_params()           # at once: the backward pass is still held back
        read = {k: v.asnumpy() for k, v in aux.items()}
        settled = _live_aux(trainer.module)
        assert all(not np.array_equal(before[k], settled[k]) for k in settled)       # the step moved them all
        for name in settled:
            np.testing.assert_array_equal(read[name], settled[name], err_msg=name)
        # the forward pass of a step changes them too, with no update() after it (MXNet's Module would not sync)
        trainer.backbone.forward(next(batches).data)
        trainer.backbone.backward(trainer.backbone.module.get_outputs()[0].ones_like())
        _, aux = trainer.backbone.get_params()
        settled = _live_aux(trainer.module)
        for name in settled:
            np.testing.assert_array_equal(aux[name].asnumpy(), settled[name], err_msg=name)
    finally:
        trainer.close()


def _write_bin(path, pairs=20):
    import cv2
    rng = np.random.default_rng(7)
    images = [cv2.imencode(".png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))[1].tobytes()
              for _ in range(2 * pairs)]
    with open(path, "wb") as f:
        pickle.dump((images, [True, False] * (pairs // 2)), f)


def _saved(out):
    """{file: {key: array}} of the run's checkpoints of steps 3 and 4 and their legacy exports."""
    import mxnet as mx
    files = {}
    for step in (3, 4):
        files["state %d" % step] = os.path.join(out, "checkpoints", "step_%09d" % step, "backbone.params")
        files["export %d" % step] = os.path.join(out, "model-%04d.params" % step)
    return {name: {k: v.asnumpy() for k, v in mx.nd.load(path).items()} for name, path in files.items()}


def test_a_verification_changes_nothing_that_is_saved_or_trained(tmp_path, slow_backward):
    """Step 3 verifies (first, as the loop does) and checkpoints, then step 4 trains and checkpoints; the same
    run without the verification saves the same bits at both steps, and the last checkpoint holds the settled
    moving statistics."""
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    _write_bin(str(tmp_path / "pairs.bin"))
    saved, live = {}, {}
    for verbose in ("3", "0"):
        out = tmp_path / ("verbose" + verbose)
        trainer = Trainer(config_from_args(tiny_train_argv(
            out, "--max-steps", "4", "--checkpoint-every", "1", "--keep-exports", "0",
            "--val-dir", str(tmp_path), "--val-targets", "pairs", "--verbose", verbose)))
        trainer.fit()
        live[verbose] = _live_aux(trainer.module)
        saved[verbose] = _saved(str(out))
    assert os.path.exists(tmp_path / "verbose3" / "best.json")          # it did verify
    assert not os.path.exists(tmp_path / "verbose0" / "best.json")
    for name in saved["0"]:
        assert sorted(saved["3"][name]) == sorted(saved["0"][name])
        for key in saved["0"][name]:
            np.testing.assert_array_equal(saved["3"][name][key], saved["0"][name][key], err_msg=name + " " + key)
    for verbose in ("3", "0"):
        for key, value in live[verbose].items():
            np.testing.assert_array_equal(saved[verbose]["state 4"]["aux:" + key], value, err_msg=key)
