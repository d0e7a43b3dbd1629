"""Row-wise L2 normalisation and its backward (embeddings and centres are compared by cosine), and the scratch
buffers the heads reuse from step to step."""
import numpy as np

NORM_EPS = 1e-12


def l2_normalize_rows(a):
    """(a / ||a||, 1 / ||a||) row-wise, float32, with the norm floored at NORM_EPS."""
    inv = np.einsum("ij,ij->i", a, a)
    np.sqrt(inv, out=inv)
    np.maximum(inv, NORM_EPS, out=inv)
    np.divide(1.0, inv, out=inv)
    return a * inv[:, None], inv


def normalization_backward(unit, inv_norm, grad_unit):
    """Gradient w.r.t. a before normalisation, given unit = a/||a|| and d(loss)/d(unit): (g - u (u.g)) / ||a||."""
    dot = np.einsum("ij,ij->i", unit, grad_unit)
    out = grad_unit - unit * dot[:, None]
    out *= inv_norm[:, None]
    return out


class Workspace:
    """Named scratch buffers reused from step to step.

    A fresh 100 MB array each step costs tens of milliseconds of page faults (the allocator maps large blocks
    anew every time); reusing the buffers keeps the pages mapped. A buffer grows when a larger shape is asked.
    """

    def __init__(self):
        self._flat = {}

    def get(self, name, shape, dtype=np.float32):
        size = int(np.prod(shape))
        buf = self._flat.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = np.empty(size, dtype=dtype)
            self._flat[name] = buf
        return buf[:size].reshape(shape)
