"""Both kernel sets of the Partial FC head (kernels_cpu.py, kernels_ndarray.py) against one NumPy reference.

The kernels are driven directly (one process): the pulled unit rows, the targets' columns (-1: the class is on
another rank, here none), the labelled mask; then the update of the pulled rows through a bank. The operator
tests (test_partial_fc.py) cover the same kernels inside the operator on 1-3 ranks.
"""
import numpy as np
import pytest

from tests.partial_fc.pfc_reference import dense_reference

ARC, COS = (1.0, 0.5, 0.0), (1.0, 0.0, 0.4)
B, K, D, SCALE = 6, 40, 8, 32.0


@pytest.fixture(scope="module")
def hvd_single():
    import horovod.mxnet as hvd
    hvd.init()
    return hvd


def _kernels(kind, margins, filt, bank):
    from collections import defaultdict
    import mxnet as mx
    from recognition.common.margin import CombinedMargin
    from recognition.partial_fc.bank_queue import BankQueue
    from recognition.partial_fc.kernels_cpu import CPUKernels
    from recognition.partial_fc.kernels_ndarray import NDArrayKernels
    cls = {"numpy": CPUKernels, "ndarray": NDArrayKernels}[kind]
    return cls(mx.cpu(), scale=SCALE, margin=CombinedMargin(*margins), interclass_filter=filt, momentum=0.9,
               weight_decay=5e-4, bank=bank, bank_jobs=BankQueue(threaded=False), timings=defaultdict(float))


@pytest.mark.parametrize("kind", ["numpy", "ndarray"])
@pytest.mark.parametrize("margins,filt", [(ARC, 0.0), (COS, 0.0), (ARC, 0.15)])
def test_kernel_set_matches_the_reference(hvd_single, kind, margins, filt):
    from collections import defaultdict
    from recognition.common.rows import l2_normalize_rows
    from recognition.partial_fc.memory_bank import DeviceBank, HostBank
    from recognition.progress import PhaseClock
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, D)).astype(np.float32)
    labels = rng.integers(0, K, B)
    labels[1] = labels[0]
    labelled = np.ones(B, bool)
    labelled[-1] = False                              # an ignored row (padding): no loss, no gradient
    bank = (HostBank if kind == "numpy" else DeviceBank)(K, D, 0, seed=4)
    w0 = bank.weight.copy()
    kernels = _kernels(kind, margins, filt, bank)
    rows, inv_norm = kernels.pull(None)
    xn, _ = l2_normalize_rows(x)
    target = np.where(labelled, labels, -1)
    loss, grad_xn = kernels.forward_backward(xn, rows, inv_norm, None, target, labelled,
                                             PhaseClock(defaultdict(float)))
    ref_loss, _, ref_dw, cos = dense_reference(x[labelled], labels[labelled], w0, np.arange(K), margins, SCALE, filt)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    # d loss / d xn from the reference's cosine gradient: recompute it here through the unit rows
    ref_xn = _reference_grad_xn(xn[labelled], w0, labels[labelled], margins, filt)
    np.testing.assert_allclose(grad_xn[labelled], ref_xn, rtol=1e-4, atol=1e-5 * np.abs(ref_xn).max())
    assert not np.any(grad_xn[~labelled])
    dw = kernels.centre_grad()
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5 * np.abs(ref_dw).max())
    kernels.update(0.1, step=0)
    # momentum starts at 0: one sgd_mom step moves each row by -lr * (grad + wd * w)
    np.testing.assert_allclose(bank.weight, w0 - 0.1 * (ref_dw + 5e-4 * w0), rtol=1e-5, atol=1e-6)
    assert kernels.pending is None


def _reference_grad_xn(x, w, labels, margins, filt):
    """d loss / d xn, the kernels' unprojected gradient (before the normalisation backward), by central
    differences of the float64 loss evaluated at xn as given."""
    xn = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    grad = np.zeros_like(xn)
    h = 1e-6
    for i in range(xn.shape[0]):
        for j in range(xn.shape[1]):
            for sign in (1, -1):
                moved = xn.copy()
                moved[i, j] += sign * h
                loss = _loss_at_unit(moved, w, labels, margins, filt)
                grad[i, j] += sign * loss / (2 * h)
    return grad


def _loss_at_unit(xn, w, labels, margins, filt):
    from tests.partial_fc.pfc_reference import margin_reference
    wn = w.astype(np.float64) / np.linalg.norm(w, axis=1, keepdims=True)
    cos = xn @ wn.T
    rows = np.arange(xn.shape[0])
    keep = np.ones_like(cos, bool) if filt <= 0 else cos <= filt
    keep[rows, labels] = True
    z = SCALE * np.where(keep, cos, 0.0)
    z[rows, labels] = SCALE * margin_reference(cos[rows, labels], *margins)
    m = z.max(axis=1, keepdims=True)
    return float(np.mean(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)) - z[rows, labels]))
