"""One logit set's loss (margin softmax + hard negatives) and d loss / d cos against the reference."""
import numpy as np
import pytest

from recognition.ffc.queue_loss import QueueLoss, hard_negative_count
from tests.ffc.ffc_reference import logit_set_loss, unit_rows

MARGINS = {"arcface": 0.5, "cosface": 0.35, "sv": 0.3}


def cosines(n, q, seed):
    rng = np.random.default_rng(seed)
    return (unit_rows(rng.standard_normal((n, 12))) @ unit_rows(rng.standard_normal((q, 12))).T).astype(np.float32)


@pytest.mark.parametrize("loss_type", ["arcface", "cosface", "sv"])
@pytest.mark.parametrize("num_target,num_fresh", [(5, 3), (4, 0), (0, 4)])
def test_matches_reference(loss_type, num_target, num_fresh):
    q, k = 40, 3
    cos = cosines(num_target + num_fresh, q, seed=num_target)
    rng = np.random.default_rng(1)
    target = rng.integers(0, q, num_target)
    if num_target:
        target[0] = target[1 % num_target]       # two rows with the same target slot
        cos[num_target - 1, target[-1]] = -0.95   # arccos beyond pi - m: ArcFace's slope-1 continuation
        cos[0, target[0]] = 0.9                   # a confident row: SV's hard negatives above cos_t - m are few
    m = MARGINS[loss_type]
    ref_loss, ref_grad = logit_set_loss(cos.astype(np.float64), list(target) + [None] * num_fresh, loss_type, m,
                                        32.0, 1.2, k)
    grad = np.full_like(cos, np.nan)
    loss = QueueLoss(loss_type, m, 32.0, 1.2, k)(cos.copy(), target, grad)
    assert loss == pytest.approx(ref_loss, rel=2e-6, abs=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())
    if num_fresh:
        assert np.count_nonzero(grad[num_target:]) <= num_fresh * k   # only the k largest cosines of a fresh row


def test_sv_transforms_exactly_the_negatives_above_target_minus_margin():
    """Row target cos 0.5, m 0.2: negatives 0.35 and 0.31 (> 0.3) become 1.2 cos + 0.2, 0.29 stays."""
    cos = np.array([[0.5, 0.35, 0.31, 0.29, -0.4]], np.float32)
    grad = np.zeros_like(cos)
    loss = QueueLoss("sv", 0.2, 10.0, 1.2, 3)(cos.copy(), np.array([0]), grad)
    z = 10.0 * np.array([0.3, 1.2 * 0.35 + 0.2, 1.2 * 0.31 + 0.2, 0.29, -0.4])
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert loss == pytest.approx(np.log(np.exp(z).sum()) - z[0], rel=1e-6)
    np.testing.assert_allclose(grad[0], 10.0 * (p - [1, 0, 0, 0, 0]) * [1, 1.2, 1.2, 1, 1], rtol=1e-5)


def test_hard_negatives_clip_at_zero_and_average_over_rows_and_k():
    cos = np.array([[0.9, -0.2, 0.1, 0.5, -0.1], [-0.3, -0.2, -0.5, -0.1, -0.6]], np.float32)
    grad = np.full_like(cos, np.nan)
    loss = QueueLoss("arcface", 0.5, 32.0, 1.2, 3)(cos.copy(), np.zeros(0, np.int64), grad)
    assert loss == pytest.approx((0.9 + 0.5 + 0.1) / 6, rel=1e-6)    # row 2: all negative, clipped to 0
    expected = np.zeros_like(cos)
    expected[0, [0, 2, 3]] = 1 / 6
    np.testing.assert_array_equal(grad, expected.astype(np.float32))


def test_target_probability_underflow_keeps_the_loss_finite():
    """scale 64 and a target 2 away from the best slot: exp(-128) underflows float32; the loss stays exact."""
    cos = np.array([[-1.0, 1.0, 0.0]], np.float32)
    grad = np.zeros_like(cos)
    loss = QueueLoss("cosface", 0.0, 64.0, 1.2, 3)(cos.copy(), np.array([0]), grad)
    z = 64.0 * np.array([-1.0, 1.0, 0.0])
    assert loss == pytest.approx(z.max() + np.log(np.exp(z - z.max()).sum()) - z[0], rel=1e-7)


@pytest.mark.parametrize("q,k", [(2, 2), (3, 3), (10_000, 3), (25_000, 5), (30_000, 6), (100_000, 10),
                                 (10_000_000, 10)])
def test_hard_negative_count(q, k):
    assert hard_negative_count(q) == k
