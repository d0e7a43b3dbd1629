"""The contract of Partial FC's kernel sets and the cross-rank softmax they share.

A kernel set computes steps 3-5 of the operator (``operator.py``) on the rows the bank pulled: the cosine
logits, the margin on each target, the exact softmax over every rank's samples, the embedding gradient, and
later the centre gradient and the SGD update of the sampled rows. Two sets exist and must agree to float32
rounding (``tests/partial_fc/test_kernels.py`` runs both against one NumPy reference):

    kernels_cpu.py      NumPy arrays on the host, each product in the kernel fastest on this CPU (``products.py``)
    kernels_ndarray.py  NDArrays on the operator's context: what a GPU runs
"""
from abc import ABC, abstractmethod

import numpy as np

from recognition import dist

class HeadKernels(ABC):
    """One kernel set of the Partial FC head. ``forward_backward`` keeps what the update needs (``pending``);
    ``update`` consumes it.

    ``scale`` s, ``margin`` (``common.margin.CombinedMargin``), ``interclass_filter`` (0: off; else negatives whose
    cosine exceeds it count as cosine 0 with no gradient, as arcface_torch's CombinedMarginLoss), ``momentum`` /
    ``weight_decay`` of the centres' SGD, the memory ``bank`` and the ordered ``bank_jobs`` queue
    (``bank_queue.BankQueue``) the update's bank writes go through.
    """

    def __init__(self, ctx, scale, margin, interclass_filter, momentum, weight_decay, bank, bank_jobs):
        self.ctx, self.scale, self.margin = ctx, float(scale), margin
        self.interclass_filter = float(interclass_filter)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.bank, self.bank_jobs = bank, bank_jobs
        self.pending = None

    def pull(self, index):
        """This set's view of bank rows ``index`` (None: all) for ``forward_backward``: (rows, 1/norms). Unit rows
        here (``bank.pull``); a set may ask the bank for another layout. Runs as a bank job."""
        return self.bank.pull(index)

    @abstractmethod
    def forward_backward(self, xn, rows, inv_norm, index, target_col, labelled, clock):
        """Loss and d loss / d xn (NumPy (B, D)) of the global batch's unit embeddings ``xn`` against this rank's
        ``rows``, 1 / norms ``inv_norm``, of bank rows ``index`` (None: all), as ``pull`` gave them.
        ``target_col[i]``: the column of row i's class among the pulled rows, -1 when another rank holds it;
        ``labelled[i]``: row i takes part in the loss. The loss is the mean over labelled rows, the same float on
        every rank."""

    @abstractmethod
    def update(self, lr, step):
        """SGD-momentum on the rows of the last ``forward_backward`` (``step`` names the bank jobs)."""

    @abstractmethod
    def centre_grad(self):
        """d loss / d (the sampled centres' raw rows) of the pending step, NumPy (k, D): for tests and
        inspection."""


def softmax_stats(row_max_local, row_sum_local, target_logit, has_target, labelled):
    """Combine the ranks' partial softmax statistics with one allgather; return (row factor, loss, rows).

    Rank r exponentiated its logits z with its own row max m_r: S_r = sum_j exp(z_j - m_r). With
    M = max_r m_r, the global sum is T = sum_r S_r exp(m_r - M), the loss of a row M + log T - z_target
    (the target logit sits on exactly one rank), and p_j = exp(z_j - m_r) * exp(m_r - M) / T: this rank's
    factor. (The same as allreducing the max, then the sums, with one synchronisation instead of two.)
    ``labelled`` (every rank knows every label) keeps ignored rows out of the loss, and their factor is 0;
    ``rows`` is the number of labelled rows, the mean's denominator (at least 1). ``row_max_local`` holds the
    float32 values the shift was applied with.
    """
    local = np.stack([row_max_local, row_sum_local, np.where(has_target, target_logit, 0.0)]).astype(np.float64)
    every = dist.allgather(local[None], name="pfc.softmax_stats")       # (world, 3, batch)
    maxima, sums, targets = every[:, 0], every[:, 1], every[:, 2]
    global_max = maxima.max(axis=0)
    total = np.sum(sums * np.exp(maxima - global_max), axis=0)
    rows = max(int(np.count_nonzero(labelled)), 1)
    row_loss = global_max + np.log(total) - targets.sum(axis=0)
    loss = float(np.sum(row_loss[labelled]) / rows)
    return np.where(labelled, np.exp(row_max_local - global_max) / total, 0.0), loss, rows
