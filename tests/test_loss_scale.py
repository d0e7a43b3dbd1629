"""Dynamic loss scaling (recognition/loss_scale.py) and its use by the trainer."""
import numpy as np
import pytest

from recognition.loss_scale import DynamicLossScaler
from tests.harness import run_ranks


def test_scale_halves_on_overflow_and_doubles_after_a_clean_window():
    scaler = DynamicLossScaler(init_scale=8.0, window=3, min_scale=2.0, max_scale=16.0)
    assert scaler.update(True) is True and scaler.scale == 4.0
    assert scaler.update(True) and scaler.update(True) and scaler.scale == 2.0       # floored at min_scale
    assert [scaler.update(False) for _ in range(3)] == [False] * 3 and scaler.scale == 4.0
    for _ in range(9):
        scaler.update(False)
    assert scaler.scale == 16.0                                                       # capped at max_scale
    scaler.update(False)
    scaler.update(True)
    state = scaler.state_dict()
    assert state == {"scale": 8.0, "good_steps": 0, "skipped": 4}
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


@pytest.mark.parametrize("kwargs", [{"init_scale": 0}, {"factor": 1.0}, {"window": 0},
                                    {"init_scale": 4.0, "min_scale": 8.0}])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="loss scale"):
        DynamicLossScaler(**kwargs)


def overflow_body():
    import mxnet as mx
    import horovod.mxnet as hvd
    scaler = DynamicLossScaler()
    finite = [mx.nd.ones((3, 2)), mx.nd.zeros(4)]
    one_bad = [mx.nd.ones((3, 2)), mx.nd.array([0, np.inf if hvd.rank() == 1 else 0, 0, 0])]
    return scaler.gradients_overflowed(finite), scaler.gradients_overflowed(one_bad)


def test_an_overflow_on_one_rank_is_seen_by_every_rank():
    assert run_ranks(overflow_body, np=2, timeout=120) == [(False, True), (False, True)]


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch):
    """The tiny test backbone in place of symbols.get_symbol, restored afterwards (other tests need the real one)."""
    import symbols
    from tests.conftest import tiny_symbol
    monkeypatch.setattr(symbols, "get_symbol", tiny_symbol)


def _trainer(tmp_path, *flags):
    import horovod.mxnet as hvd
    hvd.init()
    from tests.conftest import tiny_train_argv as _argv
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    return Trainer(config_from_args(_argv(tmp_path, "--max-steps", "3", *flags)))


def _params(trainer):
    arg, _ = trainer.module.get_params()
    return {k: v.asnumpy() for k, v in arg.items()}


def test_scaled_steps_equal_unscaled_steps(tmp_path):
    plain = _trainer(tmp_path / "plain", "--loss-scale", "none")
    scaled = _trainer(tmp_path / "scaled", "--loss-scale", "dynamic")
    assert plain.backbone.scaler is None and scaled.backbone.scaler.scale == 2.0 ** 16
    for batch in list(plain.method.reader.epoch(0))[:3]:
        assert scaled.train_step(batch) == pytest.approx(plain.train_step(batch), rel=1e-6)
        scaled.step += 1
        plain.step += 1
    a, b = _params(plain), _params(scaled)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_an_overflowing_step_skips_the_backbone_update_and_halves_the_scale(tmp_path):
    trainer = _trainer(tmp_path, "--loss-scale", "dynamic")
    scaler = trainer.backbone.scaler
    scaler.scale = 2.0 ** 127 * 1.5               # the backbone's gradients overflow float32
    before, centres = _params(trainer), trainer.method.head.pfc.weight.copy()
    batch = next(iter(trainer.method.reader.epoch(0)))
    loss = trainer.train_step(batch)
    assert np.isfinite(loss) and scaler.skipped == 1 and scaler.scale == 2.0 ** 126 * 1.5
    after = _params(trainer)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert not np.array_equal(trainer.method.head.pfc.weight, centres)     # the float32 head still learns
