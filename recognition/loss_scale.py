"""Dynamic loss scaling for float16 backbones.

The gradient that enters the backbone's backward is multiplied by ``scale``, so small float16 gradients do not
flush to zero; the optimizer divides it out again (its ``rescale_grad``). When any rank's backbone gradients
hold an inf/NaN, every rank skips the backbone update of that step and the scale halves; after ``window``
overflow-free steps it doubles. Skipping is agreed through one allreduce, so the ranks stay in step. The head
(Partial FC) computes its own gradients in float32 and is never scaled.
"""
import mxnet as mx
import numpy as np

from recognition import dist


class DynamicLossScaler:
    """The current scale and its overflow bookkeeping (state_dict / load_state_dict for exact resume)."""

    def __init__(self, init_scale=2.0 ** 16, factor=2.0, window=2000, min_scale=1.0, max_scale=2.0 ** 24):
        if not (init_scale > 0 and factor > 1 and window >= 1 and 0 < min_scale <= init_scale <= max_scale):
            raise ValueError("loss scale: need 0 < min_scale <= init_scale <= max_scale, factor > 1, window >= 1; "
                             "got %r, %r, %r, %r, %r" % (init_scale, factor, window, min_scale, max_scale))
        self.scale, self.factor, self.window = float(init_scale), float(factor), int(window)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.good_steps = 0
        self.skipped = 0

    def gradients_overflowed(self, grads):
        """True on every rank if any rank's ``grads`` (NDArrays) hold a non-finite value."""
        grads = [g for g in grads if g is not None]
        local = 0.0
        if grads:
            finite = mx.nd.multi_all_finite(*grads, num_arrays=len(grads), init_output=True)
            local = 0.0 if finite.asscalar() > 0 else 1.0
        return float(np.asarray(dist.allreduce(np.array([local], dtype=np.float32), name="loss_scale.overflow"))[0]) > 0

    def update(self, overflowed):
        """Adjust the scale after a step; returns True if the backbone update must be skipped."""
        if overflowed:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self.good_steps = 0
            self.skipped += 1
            return True
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale = min(self.scale * self.factor, self.max_scale)
            self.good_steps = 0
        return False

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))
