"""Fused per-row CPU kernels of the memory bank (numba), one pass over the sampled rows each.

NumPy would need six or more passes over the (num_sample, D) block for the same work (gather, norm, divide;
then the normalisation backward and the SGD step, plus gathers and scatters of the momentum); these loops read
each bank row once and write it once, which is what bounds them (memory traffic).

``index`` is an int64 array of bank rows, or None for "every row in order" (sample_ratio 1.0).
"""
import numpy as np
from numba import njit

NORM_EPS = 1e-12


@njit(cache=True, nogil=True, fastmath=True)
def _gather_normalize(weight, index, identity, out, inv_norm):
    n, dim = out.shape
    for i in range(n):
        r = i if identity else index[i]
        acc = np.float32(0.0)
        for j in range(dim):
            v = weight[r, j]
            acc += v * v
        norm = np.sqrt(acc)
        inv = np.float32(1.0) / (norm if norm > NORM_EPS else np.float32(NORM_EPS))
        inv_norm[i] = inv
        for j in range(dim):
            out[i, j] = weight[r, j] * inv


@njit(cache=True, nogil=True, fastmath=True)
def _fused_sgd(weight, mom, index, identity, offset, grad_unit, inv_norm, lr, momentum, wd):
    n, dim = grad_unit.shape
    for i in range(n):
        r = offset + i if identity else index[i]
        inv = inv_norm[i]
        dot = np.float32(0.0)                       # unit . grad_unit, with unit = w * inv
        for j in range(dim):
            dot += weight[r, j] * grad_unit[i, j]
        dot *= inv
        for j in range(dim):
            w = weight[r, j]
            g = (grad_unit[i, j] - w * inv * dot) * inv        # normalisation backward
            v = momentum * mom[r, j] - lr * (g + wd * w)      # sgd_mom_update
            mom[r, j] = v
            weight[r, j] = w + v


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


def gather_normalize(weight, index, workspace=None):
    """(rows / ||rows||, 1 / ||rows||) of ``weight[index]`` (all rows when index is None), float32.

    With a ``workspace`` the results live in its buffers 'unit' and 'inv_norm' (valid until the next call).
    """
    n = weight.shape[0] if index is None else index.shape[0]
    ws = workspace or Workspace()
    out = ws.get("unit", (n, weight.shape[1]))
    inv_norm = ws.get("inv_norm", (n,))
    idx = np.zeros(1, np.int64) if index is None else np.ascontiguousarray(index, dtype=np.int64)
    _gather_normalize(weight, idx, index is None, out, inv_norm)
    return out, inv_norm


def fused_sgd(weight, mom, index, grad_unit, inv_norm, lr, momentum, wd, offset=0):
    """In place on rows ``index`` of weight/mom: g = (gu - u (u.gu)) / ||w||; v = m v - lr (g + wd w); w += v.

    ``grad_unit`` is d(loss)/d(normalised row), ``inv_norm`` the 1/||w|| used in the forward pass. With
    ``index`` None the rows are offset, offset + 1, ... (a block of a full-shard step).
    """
    idx = np.zeros(1, np.int64) if index is None else np.ascontiguousarray(index, dtype=np.int64)
    _fused_sgd(weight, mom, idx, index is None, int(offset), np.ascontiguousarray(grad_unit, dtype=np.float32),
               np.ascontiguousarray(inv_norm, dtype=np.float32), np.float32(lr), np.float32(momentum),
               np.float32(wd))
