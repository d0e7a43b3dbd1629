"""Partial FC's NDArray kernel set: everything on the operator's context (what a GPU runs), through MXNet ops.

The logits are cosines (B, k) = xn . unit^T; the margin replaces each target entry, the inter-class filter zeroes
the filtered negatives, then the scale. Only the per-row statistics of the cross-rank softmax and the few target
cosines (for the float64 margin) come to the host.
"""
import numpy as np
import mxnet as mx

from recognition.partial_fc.kernels import HeadKernels, softmax_stats
from recognition.common.rows import normalization_backward
from recognition.progress import PhaseClock


class NDArrayKernels(HeadKernels):
    """See ``kernels.HeadKernels``; ``timings`` gets the seconds of the update's phases."""

    def __init__(self, ctx, bank_location="device", timings=None, **kwargs):
        super().__init__(ctx, **kwargs)
        self.timings = timings

    def forward_backward(self, xn, unit, inv_norm, index, target_col, labelled, clock):
        ctx = self.ctx
        wn = unit if isinstance(unit, mx.nd.NDArray) else mx.nd.array(unit, ctx=ctx)  # host bank: copy in
        xn_nd = mx.nd.array(xn, ctx=ctx)
        k = wn.shape[0]
        cos = mx.nd.FullyConnected(xn_nd, wn, no_bias=True, num_hidden=k)
        has_target = target_col >= 0
        col = mx.nd.array(np.where(has_target, target_col, 0), ctx=ctx, dtype="int64")
        onehot = mx.nd.one_hot(mx.nd.array(target_col, ctx=ctx, dtype="int64"), k)  # -1 -> a zero row
        cos_t = mx.nd.pick(cos, col, axis=1).asnumpy().astype(np.float64)
        psi, dpsi = self.margin(cos_t)
        psi = np.where(has_target, psi, 0.0)
        dpsi = np.where(has_target, dpsi, 1.0)
        shift = mx.nd.array((psi - np.where(has_target, cos_t, 0.0)).astype(np.float32), ctx=ctx)
        z = cos + mx.nd.broadcast_mul(onehot, shift.expand_dims(1))
        kept = None
        if self.interclass_filter > 0:      # negatives above the threshold: cosine 0, no gradient
            kept = 1 - (cos > self.interclass_filter) * (1 - onehot)
            z = z * kept
        z = z * self.scale
        target_logit = self.scale * psi
        row_max = mx.nd.max(z, axis=1).asnumpy().astype(np.float64)    # float32 values: the shift's precision
        e = mx.nd.exp(mx.nd.broadcast_sub(z, mx.nd.array(row_max, ctx=ctx).expand_dims(1)))
        factor, loss, rows = softmax_stats(row_max, mx.nd.sum(e, axis=1).asnumpy(), target_logit, has_target,
                                           labelled)
        p = mx.nd.broadcast_mul(e, mx.nd.array((factor * (self.scale / rows)).astype(np.float32),
                                               ctx=ctx).expand_dims(1))
        grad_cos = p - onehot * (self.scale / rows)
        chain = mx.nd.array(dpsi.astype(np.float32) - 1.0, ctx=ctx).expand_dims(1)
        grad_cos = grad_cos * (1 + mx.nd.broadcast_mul(onehot, chain))
        if kept is not None:
            grad_cos = grad_cos * kept
        grad_xn = mx.nd.dot(grad_cos, wn).asnumpy()
        clock.tick("head")
        self.pending = {"index": index, "unit": unit, "inv_norm": inv_norm, "grad_cos": grad_cos, "xn": xn_nd}
        return loss, grad_xn

    def update(self, lr, step):
        p, self.pending = self.pending, None
        self.bank_jobs.submit("update step %d" % step, self._apply, p, lr)

    def _apply(self, p, lr):
        clock = PhaseClock(self.timings)
        grad_unit = self._unit_grad(p)
        clock.tick("centre_gemm")
        self.bank.apply_grad(p["index"], grad_unit, p["inv_norm"], lr, self.momentum, self.weight_decay)
        clock.tick("bank_push")

    def centre_grad(self):
        p = self.pending
        grad_unit, unit, inv_norm = self._unit_grad(p), p["unit"], p["inv_norm"]
        as_numpy = lambda a: a.asnumpy() if isinstance(a, mx.nd.NDArray) else np.asarray(a)    # noqa: E731
        return normalization_backward(as_numpy(unit), as_numpy(inv_norm), as_numpy(grad_unit))

    def _unit_grad(self, p):
        """d(loss)/d(normalised sampled rows) = grad_cos^T . xn, in the bank's native array kind."""
        grad_unit = mx.nd.dot(p["grad_cos"], p["xn"], transpose_a=True)
        return grad_unit.asnumpy() if self.bank.native == "numpy" else grad_unit
