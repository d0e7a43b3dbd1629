"""The combined angular margin on the target logit: psi(cos) = cos(m1*theta + m2) - m3, theta = arccos(cos).

ArcFace is m = (1, 0.5, 0), CosFace (1, 0, 0.35 or 0.4), SphereFace-like m1 > 1. Other classes keep cos. Both the
value and d psi / d cos are computed here, in float64, on the few target entries of a batch.

Two regions need care (and are handled, not left to produce NaN):
* theta > (pi - m2) / m1, where m1*theta + m2 passes pi and cos(m1*theta + m2) would rise again (a wrong sample
  would be rewarded for getting worse). There psi continues as the straight line of slope 1 in cos that meets
  psi = -1 - m3 at the boundary, so psi stays continuous and increasing. (InsightFace's version,
  cos - m*sin(m), is discontinuous at the boundary.) With ``easy_margin=True`` the margin is applied only where
  cos > 0 and psi = cos elsewhere, as in the ArcFace paper's "easy margin" variant.
* cos = +-1, where d theta / d cos is infinite. The derivative is evaluated with sin(theta) floored at
  ``SIN_FLOOR``, so it stays finite; only samples exactly at the pole are affected.
"""
import math

import numpy as np

SIN_FLOOR = 1e-6

PRESETS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}


class CombinedMargin:
    """Target-logit transform psi and its derivative; ``scale`` is applied by the caller."""

    def __init__(self, m1=1.0, m2=0.5, m3=0.0, easy_margin=False):
        if m1 <= 0:
            raise ValueError("margin m1 must be > 0, got %r" % (m1,))
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.easy_margin = bool(easy_margin)
        self.is_additive_only = self.m1 == 1.0 and self.m2 == 0.0  # CosFace-like: psi = cos - m3, no arccos
        self.theta_max = (math.pi - self.m2) / self.m1
        self.cos_threshold = math.cos(self.theta_max) if self.theta_max < math.pi else -1.0

    def __call__(self, cos):
        """Return (psi, dpsi/dcos) for an array of target cosines (float64 arrays of the same shape)."""
        c = np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)
        if self.is_additive_only:
            return c - self.m3, np.ones_like(c)
        theta = np.arccos(c)
        angle = self.m1 * theta + self.m2
        psi = np.cos(angle) - self.m3
        dpsi = self.m1 * np.sin(angle) / np.maximum(np.sin(theta), SIN_FLOOR)
        if self.easy_margin:
            outside, fallback = c <= 0, c
        else:
            outside, fallback = theta > self.theta_max, c - self.cos_threshold - 1.0 - self.m3
        return np.where(outside, fallback, psi), np.where(outside, 1.0, dpsi)
