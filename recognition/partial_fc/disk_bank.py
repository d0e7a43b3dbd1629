"""Out-of-core memory bank: a shard of centres + momentum larger than RAM, kept in a file on local disk.

Each row of the file holds a centre and its momentum side by side (2 x D float32: one 4 KiB read per row at
D = 512). Every step only the sampled rows are read (``pull``) and written back after their update
(``apply_grad``), with explicit ``pread``/``pwrite`` calls issued from compiled loops, runs of consecutive rows
coalesced into one call - no memory map, so what stays resident is the sampled block, not the file.

The file is created sparse (``ftruncate``): nothing is written up front. A row is initialised on first use
from ``cpu_kernels.init_rows`` (a pure function of seed and class id, the same values every other bank starts
from) and momentum 0; an in-memory bitmap (one byte per row) records which rows the file holds.
"""
import ctypes
import ctypes.util
import os
import shutil
import tempfile

import numpy as np
from numba import njit

from recognition.partial_fc import cpu_kernels
from recognition.partial_fc.bank_contract import RawRowBank
from recognition.partial_fc.cpu_kernels import INIT_STD, init_key

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_pread = _libc.pread
_pwrite = _libc.pwrite
for _fn in (_pread, _pwrite):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int64)


@njit(nogil=True)
def _read_runs(fd, rows, selected, base, row_bytes):
    """pread rows[i] into slot i of the buffer at ``base`` for every selected i; consecutive rows in one call.
    Returns the first slot that failed, or -1."""
    n = rows.shape[0]
    i = 0
    while i < n:
        if not selected[i]:
            i += 1
            continue
        j = i + 1
        while j < n and selected[j] and rows[j] == rows[j - 1] + 1:
            j += 1
        size = (j - i) * row_bytes
        if _pread(fd, base + i * row_bytes, size, rows[i] * row_bytes) != size:
            return i
        i = j
    return -1


@njit(nogil=True)
def _write_runs(fd, rows, base, row_bytes):
    """pwrite slot i of the buffer at ``base`` to rows[i] for every i; consecutive rows in one call."""
    n = rows.shape[0]
    i = 0
    while i < n:
        j = i + 1
        while j < n and rows[j] == rows[j - 1] + 1:
            j += 1
        size = (j - i) * row_bytes
        if _pwrite(fd, base + i * row_bytes, size, rows[i] * row_bytes) != size:
            return i
        i = j
    return -1


class DiskBank(RawRowBank):
    """Centres and momentum of one shard in a local file (see ``bank_contract``)."""

    def __init__(self, num_local, dim, class_start, seed=0, directory=None):
        self.num_local, self.dim, self.class_start, self.seed = int(num_local), int(dim), int(class_start), seed
        self._owns_dir = directory is None
        self.directory = tempfile.mkdtemp(prefix="pfc-bank-") if directory is None else directory
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, "bank_%d_%dx%d.f32" % (self.class_start, self.num_local, self.dim))
        self.row_bytes = 2 * self.dim * 4
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.num_local * self.row_bytes)     # sparse: no data written
        self._stored = np.zeros(self.num_local, dtype=np.bool_)    # rows the file holds (others: initial values)
        self._key = init_key(seed)
        self._workspace = cpu_kernels.Workspace()
        self._pulled = None

    # ------------------------------------------------------------------------------------------- I/O
    def _load(self, rows):
        """(n, 2, D) float32 buffer with weight and momentum of ``rows`` (sorted local ids), in the workspace."""
        buf = self._workspace.get("rows", (rows.size, 2, self.dim))
        stored = self._stored[rows]
        failed = _read_runs(self._fd, rows, stored, buf.ctypes.data, self.row_bytes)
        if failed >= 0:
            raise IOError("DiskBank: short read of row %d from %s" % (rows[failed], self.path))
        fresh = ~stored
        if fresh.any():     # built in place, straight into the row buffer
            cpu_kernels.normal_rows(rows + self.class_start, self._key, INIT_STD, buf[:, 0], selected=fresh,
                                    momentum=buf[:, 1])
        return buf

    def _store(self, rows, buf):
        buf = np.ascontiguousarray(buf)
        failed = _write_runs(self._fd, rows, buf.ctypes.data, self.row_bytes)
        if failed >= 0:
            raise IOError("DiskBank: short write of row %d to %s (disk full?)" % (rows[failed], self.path))
        self._stored[rows] = True

    # ------------------------------------------------------------------------------------- bank API
    def pull(self, index):
        """(unit rows, 1/norms) of rows ``index`` (every row when None), read from disk."""
        rows = np.arange(self.num_local, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        buf = self._load(rows)
        self._pulled = (rows, buf)
        return cpu_kernels.gather_normalize(buf[:, 0], None, self._workspace)

    def pull_raw(self, index):
        """(raw rows, 1/norms) of rows ``index``, read from disk (a contiguous copy of the row buffer's centres)."""
        rows = np.arange(self.num_local, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        buf = self._load(rows)
        self._pulled = (rows, buf)
        raw = self._workspace.get("raw", (rows.size, self.dim))
        raw[...] = buf[:, 0]
        return raw, cpu_kernels.row_inv_norms(raw)

    def apply_grad(self, index, grad_unit, inv_norm, lr, momentum, wd, offset=0):
        """Update the pulled rows at positions [offset, offset + len(grad_unit)) and write them back."""
        self._update(cpu_kernels.fused_sgd, grad_unit, inv_norm, lr, momentum, wd, offset)

    def apply_scaled_grad(self, index, grad_scaled, inv_norm, lr, momentum, wd, offset=0):
        self._update(cpu_kernels.fused_sgd_scaled, grad_scaled, inv_norm, lr, momentum, wd, offset)

    def _update(self, sgd, grad, inv_norm, lr, momentum, wd, offset):
        if self._pulled is None:
            raise RuntimeError("DiskBank: an update without a pull")
        rows, buf = self._pulled
        n = grad.shape[0]
        block = buf[offset:offset + n]
        sgd(block[:, 0], block[:, 1], None, grad, inv_norm, lr, momentum, wd)
        self._store(rows[offset:offset + n], block)

    def read(self, lo, hi):
        """Copies of weight and momentum of local rows [lo, hi) (rows never used read as their initial values)."""
        rows = np.arange(lo, hi, dtype=np.int64)
        buf = self._load(rows)
        return buf[:, 0].copy(), buf[:, 1].copy()

    def write(self, lo, weight, momentum):
        rows = np.arange(lo, lo + len(weight), dtype=np.int64)
        buf = np.empty((rows.size, 2, self.dim), dtype=np.float32)
        buf[:, 0], buf[:, 1] = weight, momentum
        self._store(rows, buf)

    @property
    def weight(self):
        """The whole shard's centres (materialised: for inspection of small shards)."""
        return self.read(0, self.num_local)[0]

    @property
    def momentum(self):
        return self.read(0, self.num_local)[1]

    @property
    def rows_on_disk(self):
        return int(self._stored.sum())

    def close(self):
        """Close the file; remove it (and its folder) when the bank made the folder itself."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._owns_dir:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
