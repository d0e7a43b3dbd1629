"""What a memory bank provides: the contract of the per-rank store of class centres and their momentum.

Every bank (``memory_bank.HostBank`` / ``DeviceBank``, ``disk_bank.DiskBank``) serves the NDArray kernel set
through unit rows: ``pull`` gives the sampled rows normalised, ``apply_grad`` takes the gradient with respect to
those unit rows. The banks in host memory also serve the CPU kernel set (``kernels_cpu.py``), which multiplies
the raw rows and folds 1/||w|| into the logits' columns, so no normalised copy of the rows is ever written: they
are ``RawRowBank``s (``pull_raw`` / ``apply_scaled_grad``).
"""
from abc import ABC, abstractmethod


class MemoryBank(ABC):
    """One rank's shard: ``num_local`` rows of dimension ``dim``, global class ids from ``class_start``.
    ``native`` names the array kind it hands out ('numpy' or 'ndarray')."""

    native = None

    @abstractmethod
    def pull(self, index):
        """(unit rows, 1/norms) of rows ``index`` (sorted local ids; None: every row), valid until the next pull."""

    @abstractmethod
    def apply_grad(self, index, grad_unit, inv_norm, lr, momentum, wd):
        """SGD with momentum on rows ``index`` given d loss / d (their unit rows) and the pull's 1/norms:
        g = (gu - u (u . gu)) / ||w||; v <- momentum v - lr (g + wd w); w <- w + v. Other rows stay untouched."""

    @abstractmethod
    def read(self, lo, hi):
        """Copies of weight and momentum of local rows [lo, hi) (checkpoints)."""

    @abstractmethod
    def write(self, lo, weight, momentum):
        """Overwrite local rows [lo, lo + len(weight)) (resuming, re-sharding)."""

    @property
    @abstractmethod
    def weight(self):
        """The whole shard's centres as a NumPy array (inspection and tests)."""

    @property
    @abstractmethod
    def momentum(self):
        """The whole shard's momentum as a NumPy array."""


class RawRowBank(MemoryBank):
    """A bank in host memory that also hands out raw rows (the CPU kernel set's path)."""

    native = "numpy"

    @abstractmethod
    def pull_raw(self, index):
        """(raw rows, 1/max(||row||, eps)) of rows ``index`` (None: every row), float32, C-contiguous; valid until
        the next pull and read-only (with ``index`` None they may be the bank's own arrays)."""

    @abstractmethod
    def apply_scaled_grad(self, index, grad_scaled, inv_norm, lr, momentum, wd, offset=0):
        """``apply_grad`` given h = (d loss / d unit row) / ||w|| instead: g = h - w (w . h) / ||w||^2.
        With ``index`` None the rows are offset, offset + 1, ... (a block of a full-shard step)."""
