"""The loss of one logit set of FFC (probe rows x all Q queue slots) and its gradient w.r.t. the cosines.

Rows with a target slot: margin softmax cross-entropy over the Q slots with scale s, averaged over those rows.
Margins: ArcFace cos(theta + m) and CosFace cos - m (``common.margin.CombinedMargin``, which continues
ArcFace with slope 1 beyond theta = pi - m instead of letting cos(theta + m) rise again there), and
SV-softmax: the target becomes cos - m where cos > m, every other slot whose cosine exceeds (target cosine - m)
becomes t*cos + t - 1. Rows without a target ("fresh" identities): the mean over those rows and their k largest
cosines, each clipped below at 0 (a hard-negative penalty). A term with no rows is 0.

The softmax runs through MXNet's oneDNN ``softmax`` (several times faster here than NumPy's exp); the loss of a
row is taken as max + log(sum) - target with log(sum) = -log(p[argmax]), so it stays finite even when the
target's probability underflows float32.
"""
import numpy as np
import mxnet as mx
from numba import njit

from recognition.common.margin import CombinedMargin

LOSS_TYPES = ("arcface", "cosface", "sv")


def hard_negative_count(queue_size):
    """k, the hard negatives per fresh row: 0.02 % of the queue, at least 3 and at most 10 (and at most Q)."""
    return min(min(max(int(0.0002 * queue_size), 3), 10), int(queue_size))


@njit(cache=True, nogil=True)
def _top_k(rows, k, index_out, value_out):
    """The k largest entries of every row (descending), one pass a row; earlier columns win ties."""
    for i in range(rows.shape[0]):
        count, smallest = 0, -np.inf      # smallest kept value once k are kept: most entries stop at one compare
        for j in range(rows.shape[1]):
            v = rows[i, j]
            if count < k or v > smallest:
                p = count if count < k else k - 1
                while p > 0 and value_out[i, p - 1] < v:
                    value_out[i, p] = value_out[i, p - 1]
                    index_out[i, p] = index_out[i, p - 1]
                    p -= 1
                value_out[i, p] = v
                index_out[i, p] = j
                if count < k:
                    count += 1
                if count == k:
                    smallest = value_out[i, k - 1]


class QueueLoss:
    """Value and d/dcos of one logit set's loss. See the module docstring."""

    def __init__(self, loss="arcface", margin=0.5, scale=32.0, sv_t=1.2, hard_negatives=3):
        if loss not in LOSS_TYPES:
            raise ValueError("loss must be one of %s, got %r" % (LOSS_TYPES, loss))
        self.loss, self.margin, self.scale, self.sv_t = loss, float(margin), float(scale), float(sv_t)
        self.hard_negatives = int(hard_negatives)
        self._combined = {"arcface": CombinedMargin(1.0, self.margin, 0.0),
                          "cosface": CombinedMargin(1.0, 0.0, self.margin)}.get(loss)

    def __call__(self, cos, target, grad):
        """Loss of the rows of ``cos`` (n, Q) float32: rows [0, len(target)) have the target slots ``target``, the
        rest are fresh. Writes d(loss)/d(cos) into ``grad`` (n, Q) float32; ``cos`` is overwritten."""
        num_target = len(target)
        loss = 0.0
        if num_target:
            loss += self._margin_softmax(cos[:num_target], target, grad[:num_target])
        if num_target < cos.shape[0]:
            loss += self._hard_negative(cos[num_target:], grad[num_target:])
        return loss

    def _target_terms(self, cos_t):
        """psi(cos) and d psi / d cos of the target cosines (float64)."""
        if self._combined is not None:
            return self._combined(cos_t)
        return np.where(cos_t > self.margin, cos_t - self.margin, cos_t), np.ones_like(cos_t)

    def _margin_softmax(self, z, target, grad):
        rows = np.arange(len(target))
        n, s = len(target), self.scale
        cos_t = z[rows, target].astype(np.float64)
        psi, dpsi = self._target_terms(cos_t)
        hard = None
        if self.loss == "sv":
            hard = z > (cos_t - self.margin).astype(np.float32)[:, None]   # includes the target (cos_t > cos_t - m)
            np.multiply(z, np.float32(self.sv_t), out=z, where=hard)
            np.add(z, np.float32(self.sv_t - 1.0), out=z, where=hard)
        z[rows, target] = psi
        z *= np.float32(s)
        top = z.argmax(axis=1)
        top_logit = z[rows, top].astype(np.float64)
        out = mx.nd.from_numpy(grad.view(), zero_copy=True)
        mx.nd.softmax(mx.nd.from_numpy(z.view(), zero_copy=True), axis=-1, out=out)
        out.wait_to_read()
        del out   # grad holds the probabilities now; it is ours again
        log_sum = -np.log(grad[rows, top].astype(np.float64))
        loss = float(np.sum(top_logit + log_sum - s * psi) / n)
        p_target = grad[rows, target].astype(np.float64)
        grad *= np.float32(s / n)
        if hard is not None:
            np.multiply(grad, np.float32(self.sv_t), out=grad, where=hard)
        grad[rows, target] = (s / n) * (p_target - 1.0) * dpsi
        return loss

    def _hard_negative(self, cos, grad):
        n, k = cos.shape[0], self.hard_negatives
        index = np.empty((n, k), np.int64)
        value = np.empty((n, k), np.float32)
        _top_k(cos, k, index, value)
        grad[:] = 0.0
        positive = value > 0
        r = np.repeat(np.arange(n), k).reshape(n, k)
        grad[r[positive], index[positive]] = np.float32(1.0 / (n * k))
        return float(np.sum(value[positive], dtype=np.float64) / (n * k))
