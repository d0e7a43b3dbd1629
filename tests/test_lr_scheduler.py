"""LR schedule: hand-computed values, MXNet's MultiFactorScheduler / PolyScheduler as the reference, the
global-batch scaling and epoch-to-step conversion of build_schedule."""
import mxnet as mx
import pytest
from easydict import EasyDict as edict

from recognition.lr_scheduler import LRSchedule, build_schedule


def test_step_mode_with_warmup_by_hand():
    s = LRSchedule(0.4, total_steps=30, warmup_steps=4, mode="step", step_milestones=(10, 20), factor=0.1)
    expected = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 9: 0.4, 10: 0.04, 19: 0.04, 20: 0.004, 29: 0.004}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, rel=1e-12), step


def test_poly_mode_by_hand():
    s = LRSchedule(1.0, total_steps=10, mode="poly", power=2.0)
    # (1 - (step + 1) / 10) ** 2, 0 from the last step on
    assert [round(s(k), 12) for k in (0, 4, 8, 9, 15)] == [0.81, 0.25, 0.01, 0.0, 0.0]
    w = LRSchedule(1.0, total_steps=12, warmup_steps=2, mode="poly", power=2.0)
    assert [round(w(k), 12) for k in (0, 1, 6, 11)] == [0.5, 1.0, 0.25, 0.0]
    linear = LRSchedule(0.3, total_steps=4, mode="poly", power=1.0)
    assert [round(linear(k), 12) for k in range(4)] == [0.225, 0.15, 0.075, 0.0]


def test_multifactor_matches_mxnet():
    ours = LRSchedule(0.2, total_steps=120, warmup_steps=7, mode="step", step_milestones=(30, 60, 90), factor=0.5)
    ref = mx.lr_scheduler.MultiFactorScheduler(step=[30, 60, 90], factor=0.5, base_lr=0.2, warmup_steps=7,
                                               warmup_begin_lr=0.0, warmup_mode="linear")
    for update in range(1, 121):      # MXNet counts updates from 1; it is stateful, so call it in order
        assert ours(update - 1) == pytest.approx(ref(update), rel=1e-12, abs=1e-15), update


@pytest.mark.parametrize("warmup, power", [(0, 2.0), (13, 2.0), (5, 1.0)])
def test_poly_matches_mxnet(warmup, power):
    ours = LRSchedule(0.1, total_steps=100, warmup_steps=warmup, mode="poly", power=power)
    ref = mx.lr_scheduler.PolyScheduler(max_update=100, base_lr=0.1, pwr=power, final_lr=0.0, warmup_steps=warmup,
                                        warmup_begin_lr=0.0, warmup_mode="linear")
    for update in range(1, 111):
        assert ours(update - 1) == pytest.approx(ref(update), rel=1e-12, abs=1e-15), update


def test_state_dict_round_trip_and_mismatches():
    s = LRSchedule(0.05, total_steps=300, warmup_steps=50, mode="step", step_milestones=(100, 200))
    state = s.state_dict()
    again = LRSchedule(**state)
    assert [again(k) for k in range(300)] == [s(k) for k in range(300)]
    assert s.mismatches(state) == []
    changed = LRSchedule(0.1, total_steps=300, warmup_steps=50, mode="step", step_milestones=(100, 200))
    assert changed.mismatches(state) == ["base_lr: 0.05 -> 0.1"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="cosine"), "'step' or 'poly'"),
    (dict(base_lr=0.0), "base_lr > 0"),
    (dict(mode="poly", warmup_steps=10, total_steps=10), "fewer than total_steps"),
    (dict(step_milestones=(20, 10)), "increasing"),
    (dict(step_milestones=(0, 10)), ">= 1"),
])
def test_bad_settings_raise(kwargs, message):
    settings = dict(base_lr=0.1, total_steps=100)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LRSchedule(**settings)


def _cfg(**over):
    cfg = edict(batch_size=64, lr=0.1, lr_batch_reference=512, num_epochs=3, max_steps=None, warmup_epochs=0.5,
                lr_mode="step", lr_steps=(1, 2), lr_factor=0.1, lr_power=2.0)
    cfg.update(over)
    return cfg


def test_build_schedule_scales_lr_to_the_global_batch_and_converts_epochs():
    s = build_schedule(_cfg(), steps_per_epoch=100, world_size=4)
    assert s.base_lr == pytest.approx(0.1 * 64 * 4 / 512)
    assert (s.total_steps, s.warmup_steps, s.step_milestones) == (300, 50, (100, 200))
    assert s(99) == pytest.approx(0.05) and s(100) == pytest.approx(0.005) and s(200) == pytest.approx(0.0005)
    # the same preset on 8 ranks: twice the global batch, twice the rate
    assert build_schedule(_cfg(), 100, 8).base_lr == pytest.approx(2 * s.base_lr)


def test_build_schedule_poly_and_max_steps_leaves_the_curve_alone():
    s = build_schedule(_cfg(lr_mode="poly", warmup_epochs=0.0), steps_per_epoch=100, world_size=1)
    assert (s.total_steps, s.mode, s.step_milestones) == (300, "poly", ())
    assert s(299) == 0.0 and s(0) == pytest.approx(0.0125 * (1 - 1 / 300) ** 2)
    # max_steps only stops the run early: the schedule of a cut-short run is the full run's
    cut = build_schedule(_cfg(max_steps=120, lr_mode="poly", warmup_epochs=0.0), steps_per_epoch=100, world_size=1)
    assert cut.state_dict() == s.state_dict()
    assert build_schedule(_cfg(max_steps=10 ** 6), 100, 1).total_steps == 300


def test_build_schedule_rejects_milestones_that_collapse():
    with pytest.raises(ValueError, match="lr_steps"):
        build_schedule(_cfg(lr_steps=(0.1, 0.2)), steps_per_epoch=3, world_size=1)
