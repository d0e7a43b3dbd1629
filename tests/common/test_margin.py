"""The combined margin: hand-computed values, derivatives, continuity, no NaN at cos = +-1."""
import math

import numpy as np
import pytest

from recognition.common.margin import CombinedMargin


def test_arcface_hand_computed():
    m = CombinedMargin(1.0, 0.5, 0.0)
    cos = np.array([0.8, 0.0, 0.5])
    psi, dpsi = m(cos)
    theta = np.arccos(cos)
    np.testing.assert_allclose(psi, [math.cos(math.acos(0.8) + 0.5), math.cos(math.pi / 2 + 0.5),
                                     math.cos(math.pi / 3 + 0.5)], rtol=1e-12)
    np.testing.assert_allclose(dpsi, np.sin(theta + 0.5) / np.sin(theta), rtol=1e-12)


def test_cosface_is_a_shift_with_unit_slope():
    psi, dpsi = CombinedMargin(1.0, 0.0, 0.4)(np.array([-1.0, 0.3, 1.0]))
    np.testing.assert_allclose(psi, [-1.4, -0.1, 0.6])
    np.testing.assert_allclose(dpsi, [1.0, 1.0, 1.0])


def test_combined_hand_computed():
    psi, dpsi = CombinedMargin(1.2, 0.3, 0.1)(np.array([0.6]))
    t = math.acos(0.6)
    assert psi[0] == pytest.approx(math.cos(1.2 * t + 0.3) - 0.1, rel=1e-12)
    assert dpsi[0] == pytest.approx(1.2 * math.sin(1.2 * t + 0.3) / math.sin(t), rel=1e-12)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.35, 0.2, 0.1), (4.0, 0.0, 0.0)])
def test_no_nan_at_the_poles_and_finite_derivative(margins):
    psi, dpsi = CombinedMargin(*margins)(np.array([-1.0, 1.0, 1.0 + 1e-7, -1.0 - 1e-7]))
    assert np.all(np.isfinite(psi)) and np.all(np.isfinite(dpsi))


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.35, 0.2, 0.1), (2.0, 0.0, 0.0)])
def test_continuous_and_increasing_across_the_pi_boundary(margins):
    m = CombinedMargin(*margins)
    c = np.linspace(-1, 1, 20001)
    psi, dpsi = m(c)
    assert np.all(np.diff(psi) > 0)                      # monotone: a worse angle never scores better
    assert np.max(np.abs(np.diff(psi))) < 1e-2          # no jump (InsightFace's fallback jumps)
    # derivative agrees with finite differences away from the boundary kink and the poles
    inner = (np.abs(c - m.cos_threshold) > 1e-3) & (np.abs(c) < 0.999)
    fd = np.gradient(psi, c)
    np.testing.assert_allclose(dpsi[inner][1:-1], fd[inner][1:-1], rtol=2e-3, atol=2e-3)


def test_easy_margin_leaves_negative_cosines_alone():
    psi, dpsi = CombinedMargin(1.0, 0.5, 0.0, easy_margin=True)(np.array([-0.3, 0.4]))
    assert psi[0] == pytest.approx(-0.3) and dpsi[0] == 1.0
    assert psi[1] == pytest.approx(math.cos(math.acos(0.4) + 0.5))


def test_bad_m1():
    with pytest.raises(ValueError, match="m1"):
        CombinedMargin(0.0, 0.5, 0.0)
