"""Per-rank storage of the class centres W and their SGD momentum ("parameter server" style).

Each step the Partial FC operator pulls the sampled rows, L2-normalised (``pull``), computes the gradient with
respect to those unit rows and hands it back (``apply_grad``); the bank turns it into the gradient of the raw
rows, g = (gu - u (u . gu)) / ||w||, and applies MXNet's ``sgd_mom_update`` rule to those rows only:
    v <- momentum * v - lr * (g + wd * w);   w <- w + v
Rows that were not sampled keep weight and momentum untouched. Fusing the normalisation into the bank lets the
CPU bank do pull and update in one pass over the rows each (``cpu_kernels``).

Where the shard lives:
* ``HostBank``   - NumPy arrays in host memory (also the CPU "device" bank: on a CPU they are the same memory);
* ``DeviceBank`` - NDArrays on an accelerator context (``mx.gpu(i)``);
* ``DiskBank``   - (``disk_bank.py``) an out-of-core file for shards larger than RAM.

``bank_contract.py`` states what a bank provides. Initial centres are a pure function of (seed, global class
id) (``cpu_kernels.init_rows``), so a shard's initial rows are the same whatever the world size and whichever
bank holds them.
"""
import numpy as np
import mxnet as mx

from recognition.common.rows import NORM_EPS
from recognition.partial_fc import cpu_kernels
from recognition.partial_fc.bank_contract import MemoryBank, RawRowBank
from recognition.partial_fc.cpu_kernels import INIT_STD, init_key, init_rows
from recognition.partial_fc.disk_bank import DiskBank

class HostBank(RawRowBank):
    """The shard and its momentum as NumPy arrays in host memory.

    For full-shard steps (sample ratio 1.0) it keeps every row's 1/norm, refreshed by each update while the row
    is in cache, so such a step reads no row before its products; sampled rows get theirs as they are gathered.
    An update of sampled rows marks the kept norms stale; the next full pull recomputes them."""

    def __init__(self, num_local, dim, class_start, seed=0):
        self.num_local, self.dim, self.class_start = int(num_local), int(dim), int(class_start)
        self._w = np.empty((self.num_local, self.dim), dtype=np.float32)
        cpu_kernels.normal_rows(np.arange(self.num_local) + self.class_start, init_key(seed), INIT_STD, self._w)
        self._m = np.zeros_like(self._w)
        self._inv_norm = np.empty(self.num_local, np.float32)
        self._norms_valid = False       # computed at the first full pull
        self._workspace = cpu_kernels.Workspace()   # pulled rows are valid until the next pull

    @property
    def weight(self):
        return self._w

    @property
    def momentum(self):
        return self._m

    def pull(self, index):
        return cpu_kernels.gather_normalize(self._w, index, self._workspace)

    def pull_raw(self, index):
        if index is not None:
            return cpu_kernels.gather_rows(self._w, index, self._workspace.get("rows", (len(index), self.dim)))
        if not self._norms_valid:
            cpu_kernels.update_inv_norms(self._w, self._inv_norm)
            self._norms_valid = True
        # the rows themselves, no copy; the 1/norms copied (the update refreshes them in place)
        return self._w, self._inv_norm.copy()

    def apply_grad(self, index, grad_unit, inv_norm, lr, momentum, wd, offset=0):
        """See ``MemoryBank``; with ``index`` None the rows are ``offset ...`` (a pulled block in pieces)."""
        cpu_kernels.fused_sgd(self._w, self._m, index, grad_unit, inv_norm, lr, momentum, wd, offset,
                              norms=self._kept_norms(index))

    def apply_scaled_grad(self, index, grad_scaled, inv_norm, lr, momentum, wd, offset=0):
        cpu_kernels.fused_sgd_scaled(self._w, self._m, index, grad_scaled, inv_norm, lr, momentum, wd, offset,
                                     norms=self._kept_norms(index))

    def _kept_norms(self, index):
        """The norms array an update of rows ``index`` refreshes (None: it does not; then they are stale)."""
        if index is not None:
            self._norms_valid = False
        return self._inv_norm if self._norms_valid else None

    def read(self, lo, hi):
        return self._w[lo:hi].copy(), self._m[lo:hi].copy()

    def write(self, lo, weight, momentum):
        hi = lo + len(weight)
        self._w[lo:hi] = weight
        self._m[lo:hi] = momentum
        if self._norms_valid:
            cpu_kernels.update_inv_norms(self._w, self._inv_norm, lo, hi)


class DeviceBank(MemoryBank):
    """The shard and its momentum as NDArrays on ``ctx`` (an accelerator's memory)."""

    native = "ndarray"

    def __init__(self, num_local, dim, class_start, seed=0, ctx=None):
        self.num_local, self.dim, self.class_start = int(num_local), int(dim), int(class_start)
        self.ctx = ctx or mx.cpu()
        self._w = mx.nd.zeros((self.num_local, self.dim), ctx=self.ctx, dtype="float32")
        self._m = mx.nd.zeros((self.num_local, self.dim), ctx=self.ctx, dtype="float32")
        chunk = 1 << 16
        for lo in range(0, self.num_local, chunk):
            hi = min(lo + chunk, self.num_local)
            self._w[lo:hi] = mx.nd.array(init_rows(np.arange(lo, hi) + self.class_start, self.dim, seed),
                                         ctx=self.ctx)

    @property
    def weight(self):
        return self._w.asnumpy()

    @property
    def momentum(self):
        return self._m.asnumpy()

    def _index(self, index):
        return mx.nd.array(index, ctx=self.ctx, dtype="int64")

    def _rows(self, index):
        return (self._w, self._m) if index is None else (mx.nd.take(self._w, index), mx.nd.take(self._m, index))

    def pull(self, index):
        idx = None if index is None else self._index(index)
        rows = self._w if idx is None else mx.nd.take(self._w, idx)
        norm = mx.nd.sqrt(mx.nd.sum(rows * rows, axis=1))
        inv_norm = 1.0 / mx.nd.maximum(norm, NORM_EPS)
        return mx.nd.broadcast_mul(rows, inv_norm.expand_dims(1)), inv_norm

    def apply_grad(self, index, grad_unit, inv_norm, lr, momentum, wd):
        idx = None if index is None else self._index(index)
        rows, mom = self._rows(idx)
        unit = mx.nd.broadcast_mul(rows, inv_norm.expand_dims(1))
        dot = mx.nd.sum(unit * grad_unit, axis=1, keepdims=True)
        grad = mx.nd.broadcast_mul(grad_unit - mx.nd.broadcast_mul(unit, dot), inv_norm.expand_dims(1))
        mx.nd.sgd_mom_update(rows, grad, mom, out=rows, lr=float(lr), momentum=float(momentum), wd=float(wd))
        if idx is not None:
            self._w[idx] = rows
            self._m[idx] = mom

    def read(self, lo, hi):
        return self._w[lo:hi].asnumpy(), self._m[lo:hi].asnumpy()

    def write(self, lo, weight, momentum):
        hi = lo + len(weight)
        self._w[lo:hi] = mx.nd.array(weight, ctx=self.ctx)
        self._m[lo:hi] = mx.nd.array(momentum, ctx=self.ctx)


def make_bank(location, ctx, num_local, dim, class_start, seed=0, kernels="numpy", disk_dir=None):
    """The bank for ``location`` in {'device', 'host', 'disk'}.

    'device' means the memory the operator computes in: NDArrays on ``ctx`` for the NDArray kernels, host
    NumPy arrays for the NumPy kernels (which only run on a CPU context, where the two are the same memory).
    """
    if location == "disk":
        return DiskBank(num_local, dim, class_start, seed=seed, directory=disk_dir)
    if location == "host" or (location == "device" and kernels == "numpy"):
        return HostBank(num_local, dim, class_start, seed=seed)
    if location == "device":
        return DeviceBank(num_local, dim, class_start, seed=seed, ctx=ctx)
    raise ValueError("bank_location must be one of 'device', 'host', 'disk'; got %r" % (location,))
