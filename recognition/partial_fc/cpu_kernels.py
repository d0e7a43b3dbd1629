"""Fused per-row CPU kernels of the memory bank and the CPU head (numba), one pass over the rows each.

NumPy would need six or more passes over the (num_sample, D) block for the same work (gather, norm, divide;
then the normalisation backward and the SGD step, plus gathers and scatters of the momentum); these loops read
each bank row once and write it once, which is what bounds them (memory traffic).

``index`` is an int64 array of bank rows, or None for "every row in order" (sample_ratio 1.0).

``_normal_rows`` computes the banks' deterministic initial centres (``init_rows`` documents the
formula) one element at a time, several times faster than the same formula in NumPy; the disk bank builds every
never-stored row it pulls with it.
"""
import math

import numpy as np
from numba import njit

from recognition.common.rows import NORM_EPS, Workspace

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)     # SplitMix64 constants
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_PI = np.float32(2.0 * np.pi)
INIT_STD = 0.01                             # initial centres: N(0, INIT_STD^2) entries


def _splitmix64(x):
    """SplitMix64 finaliser over a uint64 array (a good, fast hash of a counter)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def init_key(seed):
    """The hash key of a run's initial centres."""
    return _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x632BE59BD9B4E019))


def init_rows(class_ids, dim, seed, std=INIT_STD):
    """Initial centres of the given global class ids: N(0, std^2) entries, float32 (len(class_ids), dim).

    Entry (c, j) is Box-Muller of a SplitMix64 hash of (seed, c * dim + j): independent of sharding, of the
    bank and of the order rows are asked for, and cheap to recompute for any subset (the disk bank builds rows
    lazily on first use). Computed by ``normal_rows``.
    """
    ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    out = np.empty((ids.size, dim), dtype=np.float32)
    normal_rows(ids, init_key(seed), std, out)
    return out


@njit(cache=True, nogil=True)
def _normal_rows(class_ids, selected, every_row, key, std, out, momentum, zero_momentum):
    """out[i] = the initial centre of class_ids[i] (and momentum[i] = 0) for each selected i.

    Entry j: Box-Muller of SplitMix64((id * dim + j) ^ key). The 24-bit uniforms are exact in float32, and the
    float32 log / sqrt / cos (half the cost of float64's) stay within a few float32 ulps of the float64 formula
    (no fastmath: the values must not depend on the vectoriser)."""
    n, dim = out.shape
    scale = np.float32(1.0 / 16777216.0)
    for i in range(n):
        if not every_row and not selected[i]:
            continue
        base = np.uint64(class_ids[i]) * np.uint64(dim)
        for j in range(dim):
            z = ((base + np.uint64(j)) ^ key) + _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            h = z ^ (z >> np.uint64(31))
            u1 = (np.float32(h >> np.uint64(40)) + np.float32(1.0)) * scale     # (0, 1]
            u2 = np.float32(h & np.uint64(0xFFFFFF)) * scale                     # [0, 1)
            out[i, j] = std * math.sqrt(np.float32(-2.0) * math.log(u1)) * math.cos(_TWO_PI * u2)
            if zero_momentum:
                momentum[i, j] = 0.0


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
def _inv_norms(weight, lo, hi, out):
    """out[r] = 1 / max(||weight[r]||, NORM_EPS) for the rows lo .. hi - 1. Every 1/norm a bank keeps comes from
    this one compiled loop (C-contiguous float32 rows, one signature), so a norm kept up to date after an update
    has the same bits as the norm recomputed from the same row after a resume."""
    for r in range(lo, hi):
        acc = np.float32(0.0)
        for j in range(weight.shape[1]):
            acc += weight[r, j] * weight[r, j]
        norm = np.sqrt(acc)
        out[r] = np.float32(1.0) / (norm if norm > NORM_EPS else np.float32(NORM_EPS))


@njit(cache=True, nogil=True, fastmath=True)
def _gather_rows(weight, index, out, inv_norm):
    """out[i] = weight[index[i]] and inv_norm[i] its 1/norm, in one pass over the rows."""
    for i in range(index.shape[0]):
        r = index[i]
        acc = np.float32(0.0)
        for j in range(weight.shape[1]):
            v = weight[r, j]
            out[i, j] = v
            acc += v * v
        norm = np.sqrt(acc)
        inv_norm[i] = np.float32(1.0) / (norm if norm > NORM_EPS else np.float32(NORM_EPS))


NORM_CHUNK = 32     # rows updated before their norms are taken, while they are still in the first-level cache


@njit(cache=True, nogil=True, fastmath=True)
def _fused_sgd(weight, mom, index, identity, offset, grad, inv_norm, lr, momentum, wd, scaled, norms, keep):
    """The SGD step of ``fused_sgd`` (``scaled`` False) or ``fused_sgd_scaled`` (True) on each row; with ``keep``
    (``index`` None only) the rows' new 1/norms go to ``norms``, by ``_inv_norms`` a few rows at a time."""
    n, dim = grad.shape
    for lo in range(0, n, NORM_CHUNK):
        hi = min(lo + NORM_CHUNK, n)
        for i in range(lo, hi):
            r = offset + i if identity else index[i]
            inv = inv_norm[i]
            dot = np.float32(0.0)
            for j in range(dim):
                dot += weight[r, j] * grad[i, j]
            # g = (gu - u (u . gu)) inv with u = w inv, or g = h - w inv^2 (w . h) with h = gu inv: g = a grad - c w
            a = np.float32(1.0) if scaled else inv
            c = inv * inv * dot * a
            for j in range(dim):
                w = weight[r, j]
                g = a * grad[i, j] - c * w                           # normalisation backward
                v = momentum * mom[r, j] - lr * (g + wd * w)      # sgd_mom_update
                mom[r, j] = v
                weight[r, j] = w + v
        if keep:
            _inv_norms(weight, offset + lo, offset + hi, norms)


@njit(cache=True, nogil=True, fastmath=True)
def _scale_columns(a, row_factor, col_factor, rows_too):
    batch, k = a.shape
    for b in range(batch):
        f = row_factor[b] if rows_too else np.float32(1.0)
        for j in range(k):
            a[b, j] *= f * col_factor[j]


def scale_columns(a, col_factor, row_factor=None):
    """a[b, j] *= col_factor[j] (times row_factor[b] when given), in place on a C-contiguous float32 (B, k): one
    pass over the head's logits."""
    rows_too = row_factor is not None
    _scale_columns(a, np.ascontiguousarray(row_factor if rows_too else np.ones(1), dtype=np.float32),
                   np.ascontiguousarray(col_factor, dtype=np.float32), rows_too)
    return a


@njit(cache=True, nogil=True)
def _transpose_columns(src, lo, out):
    n, rows = out.shape
    for j in range(n):          # contiguous writes; the strided reads of column j + 1 hit the lines column j loaded
        for b in range(rows):
            out[j, b] = src[b, lo + j]


def transpose_columns(src, lo, hi, out):
    """out (hi - lo, B) = src[:, lo:hi]^T for a C-contiguous (B, k) ``src`` with a small B (the batch)."""
    _transpose_columns(src, int(lo), out[:hi - lo])
    return out[:hi - lo]


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


def normal_rows(class_ids, key, std, out, selected=None, momentum=None):
    """Fill ``out[i]`` with the initial centre of ``class_ids[i]`` (and zero ``momentum[i]``), for every i or only
    where ``selected`` is True. ``out`` and ``momentum`` may be strided views (the disk bank's row buffer)."""
    ids = np.ascontiguousarray(class_ids, dtype=np.int64)
    mask = np.ones(1, np.bool_) if selected is None else np.ascontiguousarray(selected, dtype=np.bool_)
    mom = np.zeros((1, 1), np.float32) if momentum is None else momentum
    _normal_rows(ids, mask, selected is None, np.uint64(key), np.float32(std), out, mom, momentum is not None)


def fused_sgd(weight, mom, index, grad_unit, inv_norm, lr, momentum, wd, offset=0, norms=None):
    """In place on rows ``index`` of weight/mom: g = (gu - u (u.gu)) / ||w||; v = m v - lr (g + wd w); w += v.

    ``grad_unit`` is d(loss)/d(normalised row), ``inv_norm`` the 1/||w|| used in the forward pass. With
    ``index`` None the rows are offset, offset + 1, ... (a block of a full-shard step); then ``norms``, a bank's
    (num_rows,) array of 1/norms, may be kept up to date for the updated rows (``update_inv_norms``' bits).
    """
    _sgd(weight, mom, index, grad_unit, inv_norm, lr, momentum, wd, offset, norms, False)


def fused_sgd_scaled(weight, mom, index, grad_scaled, inv_norm, lr, momentum, wd, offset=0, norms=None):
    """``fused_sgd`` given h = gu / ||w|| (what the CPU head's raw-row products give): g = h - w (w.h) / ||w||^2."""
    _sgd(weight, mom, index, grad_scaled, inv_norm, lr, momentum, wd, offset, norms, True)


def _sgd(weight, mom, index, grad, inv_norm, lr, momentum, wd, offset, norms, scaled):
    if norms is not None and index is not None:
        raise ValueError("the 1/norms are kept for updates of consecutive rows (index None) only")
    idx = np.zeros(1, np.int64) if index is None else np.ascontiguousarray(index, dtype=np.int64)
    keep = norms is not None
    _fused_sgd(weight, mom, idx, index is None, int(offset), np.ascontiguousarray(grad, dtype=np.float32),
               np.ascontiguousarray(inv_norm, dtype=np.float32), np.float32(lr), np.float32(momentum),
               np.float32(wd), scaled, norms if keep else np.zeros(1, np.float32), keep)


def update_inv_norms(weight, norms, lo=0, hi=None):
    """norms[r] = 1 / max(||weight[r]||, NORM_EPS) for the rows lo .. hi - 1 of a C-contiguous float32
    ``weight``: the only way a bank's kept 1/norms are computed (see ``_inv_norms``)."""
    _inv_norms(weight, int(lo), int(weight.shape[0] if hi is None else hi), norms)
    return norms


def row_inv_norms(weight):
    """1 / max(||row||, NORM_EPS) of every row of a C-contiguous float32 ``weight`` (the bits a bank keeps)."""
    return update_inv_norms(weight, np.empty(weight.shape[0], np.float32))


def gather_rows(weight, index, out):
    """(out[:n], 1/norms): out[i] = weight[index[i]] (raw rows, for the products) and its 1/max(||row||, eps)."""
    n = len(index)
    inv_norm = np.empty(n, np.float32)
    _gather_rows(weight, np.ascontiguousarray(index, dtype=np.int64), out, inv_norm)
    return out[:n], inv_norm
