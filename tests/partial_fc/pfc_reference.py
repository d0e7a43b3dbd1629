"""A dense, single-process NumPy (float64) reference of the Partial FC loss and its gradients."""
import numpy as np


def margin_reference(cos, m1, m2, m3):
    """psi(cos) = cos(m1*acos(cos) + m2) - m3 inside the monotone range, the slope-1 continuation beyond."""
    theta = np.arccos(np.clip(cos, -1, 1))
    theta_max = (np.pi - m2) / m1
    inside = theta <= theta_max
    c_th = np.cos(theta_max) if theta_max < np.pi else -1.0
    return np.where(inside, np.cos(m1 * theta + m2) - m3, cos - c_th - 1.0 - m3)


def dense_reference(x, labels, weight, classes, margins, scale, interclass_filter=0.0):
    """Loss and gradients of the margin softmax over the class subset ``classes`` (sorted global ids).

    x (B, D) raw embeddings, labels (B,) global ids (all in ``classes``), weight (C_total, D) raw centres.
    Returns loss, d loss/d x (B, D), d loss/d weight[classes] (len(classes), D), and the logits matrix.
    Gradients by the chain rule written out independently of the operator's kernels.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)[classes]
    m1, m2, m3 = margins
    xnorm = np.linalg.norm(x, axis=1, keepdims=True)
    wnorm = np.linalg.norm(w, axis=1, keepdims=True)
    xn, wn = x / xnorm, w / wnorm
    cos = xn @ wn.T
    b = x.shape[0]
    col = np.searchsorted(classes, labels)
    assert np.all(classes[col] == labels)
    rows = np.arange(b)
    ct = cos[rows, col]
    psi = margin_reference(ct, m1, m2, m3)
    # dpsi/dcos by central finite differences on the float64 formula (independent of the analytic form)
    h = 1e-7
    dpsi = (margin_reference(np.clip(ct + h, -1, 1), m1, m2, m3)
            - margin_reference(np.clip(ct - h, -1, 1), m1, m2, m3)) / (np.clip(ct + h, -1, 1) - np.clip(ct - h, -1, 1))
    # inter-class filter as arcface_torch's CombinedMarginLoss: a negative above the threshold becomes cosine 0
    # (a constant: it stays in the denominator and gets no gradient)
    keep = np.ones_like(cos, dtype=bool)
    if interclass_filter > 0:
        keep = cos <= interclass_filter
        keep[rows, col] = True
    z = scale * np.where(keep, cos, 0.0)
    z[rows, col] = scale * psi
    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(z - zmax)
    p = e / e.sum(axis=1, keepdims=True)
    loss = np.mean(-np.log(p[rows, col]))
    dz = p.copy()
    dz[rows, col] -= 1
    dz /= b
    dz[~keep] = 0.0
    dcos = scale * dz
    dcos[rows, col] *= dpsi
    dxn = dcos @ wn
    dwn = dcos.T @ xn
    dx = (dxn - xn * np.sum(xn * dxn, axis=1, keepdims=True)) / xnorm
    dw = (dwn - wn * np.sum(wn * dwn, axis=1, keepdims=True)) / wnorm
    return loss, dx, dw, cos


def init_rows_reference(class_ids, dim, seed, std=0.01):
    """The banks' initial centres by their formula in plain NumPy: entry (c, j) is Box-Muller of the SplitMix64
    hash of (c * dim + j) xor the seed's key."""
    def splitmix64(x):
        with np.errstate(over="ignore"):
            z = x + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))
    key = splitmix64(np.uint64(seed) + np.uint64(0x632BE59BD9B4E019))
    ids = np.asarray(class_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = splitmix64((ids[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)) ^ key)
    u1 = ((h >> np.uint64(40)).astype(np.float64) + 1.0) / (1 << 24)
    u2 = (h & np.uint64(0xFFFFFF)).astype(np.float64) / (1 << 24)
    return (std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
