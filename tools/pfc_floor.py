"""The independent floors of ``tools/benchmark_pfc.py``, written without any code of the head they measure.

- ``FloorProducts``: the Partial FC step's three matrix products at (B, k, D) in every kernel available here
  (oneDNN ``FullyConnected`` on operands laid out as it wants them, also its recorded data gradient; MXNet's
  ``nd.dot``; numpy's BLAS on transposed copies and on strided views), outputs in reused buffers.
- ``BankPasses``: the bank floor, the memory traffic a bank of weights and momenta in host memory adds to any
  step: the gather of the k sampled rows of a (num_local x D) shard into the products' operand (none when every
  row is sampled: the products can read the shard itself) and one SGD-with-momentum pass over those rows (read
  weight, momentum and gradient; write weight and momentum), without the normalisation the head adds.
- ``FloorWorker``: both in a fresh process per rank (spawned: no head, no Horovod), which times every product
  kernel at start-up, keeps the fastest of each, then times the floors once per request.
"""
import multiprocessing
import time

import numpy as np
import mxnet as mx
from numba import njit

PRODUCTS = ("logits", "embedding", "centre")
FLOOR_KERNELS = {"logits": ("onednn", "dot", "numpy"),
                 "embedding": ("onednn", "onednn-backward", "dot", "numpy"),
                 "centre": ("onednn", "dot", "numpy", "numpy-strided")}


def _nd(a):
    return mx.nd.from_numpy(a.view(), zero_copy=True)


class FloorProducts:
    """The three products of one step at (batch, k, dim) in every kernel of ``FLOOR_KERNELS``, written for this
    benchmark alone: each operand laid out as its kernel wants it, outputs in reused buffers."""

    def __init__(self, batch, k, dim, block_rows):
        rng = np.random.default_rng(0)
        self.k, self.dim, self.block_rows = k, dim, block_rows
        self.x = rng.standard_normal((batch, dim), dtype=np.float32)
        self.w = rng.standard_normal((k, dim), dtype=np.float32)
        self.g = rng.standard_normal((batch, k), dtype=np.float32)
        self.w_t, self.g_t, self.x_t = (np.ascontiguousarray(a.T) for a in (self.w, self.g, self.x))
        self.z = np.empty((batch, k), np.float32)
        self.e = np.empty((batch, dim), np.float32)
        self.c = np.empty((min(block_rows, k), dim), np.float32)

    def run(self, product, kernel):
        """Seconds of one ``product`` with ``kernel`` (its result in self.z / self.e / self.c)."""
        if product == "embedding" and kernel == "onednn-backward":     # the recorded forward is not timed
            x, x_grad = mx.nd.array(self.x), mx.nd.zeros(self.x.shape)
            mx.autograd.mark_variables([x], [x_grad])
            with mx.autograd.record(train_mode=False):
                z = mx.nd.FullyConnected(x, _nd(self.w), no_bias=True, num_hidden=self.k, out=_nd(self.z))
            z.wait_to_read()
            start = time.perf_counter()
            z.backward(out_grad=_nd(self.g))
            x_grad.copyto(_nd(self.e)).wait_to_read()
            return time.perf_counter() - start
        start = time.perf_counter()
        if product == "logits":
            if kernel == "onednn":
                mx.nd.FullyConnected(_nd(self.x), _nd(self.w), no_bias=True, num_hidden=self.k,
                                     out=_nd(self.z)).wait_to_read()
            elif kernel == "dot":
                mx.nd.dot(_nd(self.x), _nd(self.w), transpose_b=True, out=_nd(self.z)).wait_to_read()
            else:
                np.matmul(self.x, self.w.T, out=self.z)
        elif product == "embedding":
            if kernel == "onednn":
                mx.nd.FullyConnected(_nd(self.g), _nd(self.w_t), no_bias=True, num_hidden=self.dim,
                                     out=_nd(self.e)).wait_to_read()
            elif kernel == "dot":
                mx.nd.dot(_nd(self.g), _nd(self.w), out=_nd(self.e)).wait_to_read()
            else:
                np.matmul(self.g, self.w, out=self.e)
        else:
            x_t, x = _nd(self.x_t), _nd(self.x)
            for lo in range(0, self.k, self.block_rows):
                hi = min(lo + self.block_rows, self.k)
                out = self.c[:hi - lo]
                if kernel == "onednn":
                    mx.nd.FullyConnected(_nd(self.g_t[lo:hi]), x_t, no_bias=True, num_hidden=self.dim,
                                         out=_nd(out)).wait_to_read()
                elif kernel == "dot":
                    mx.nd.dot(_nd(self.g_t[lo:hi]), x, out=_nd(out)).wait_to_read()
                elif kernel == "numpy":
                    np.matmul(self.g_t[lo:hi], self.x, out=out)
                else:
                    np.matmul(self.g[:, lo:hi].T, self.x, out=out)
        return time.perf_counter() - start


@njit(cache=True, nogil=True)
def _gather(weight, index, out):
    # element loop: twice as fast as numba's row-slice copy, three times np.take's (measured on the EPYC VM)
    for i in range(index.shape[0]):
        r = index[i]
        for j in range(weight.shape[1]):
            out[i, j] = weight[r, j]


@njit(cache=True, nogil=True, fastmath=True)
def _sgd_rows(weight, mom, index, grad, lr, momentum, wd):
    for i in range(index.shape[0]):
        r = index[i]
        for j in range(weight.shape[1]):
            w = weight[r, j]
            v = momentum * mom[r, j] - lr * (grad[i, j] + wd * w)
            mom[r, j] = v
            weight[r, j] = w + v


class BankPasses:
    """The bank floor: a shard of ``num_local`` rows and its momentum, ``k`` sampled rows (sorted, uniformly
    random; all rows when k == num_local). ``run`` times the gather of those rows into a (k x D) operand (skipped
    when every row is sampled) and an SGD-with-momentum pass over them."""

    def __init__(self, num_local, k, dim):
        rng = np.random.default_rng(2)
        self.weight = np.full((num_local, dim), 0.01, np.float32)    # every page written: no zero-page reads
        self.mom = np.full((num_local, dim), 0.001, np.float32)
        self.grad = rng.standard_normal((k, dim), dtype=np.float32)
        self.out = np.empty((k, dim), np.float32) if k < num_local else None
        self.index = (np.sort(rng.choice(num_local, k, replace=False)) if k < num_local
                      else np.arange(num_local)).astype(np.int64)
        self.run()      # compile

    def run(self):
        """{'gather': s, 'update': s} of one pull and one update (lr 1e-6: the values stay put)."""
        start = time.perf_counter()
        if self.out is not None:
            _gather(self.weight, self.index, self.out)
        mid = time.perf_counter()
        _sgd_rows(self.weight, self.mom, self.index, self.grad, np.float32(1e-6), np.float32(0.9), np.float32(5e-4))
        return {"gather": mid - start, "update": time.perf_counter() - mid}


def floor_worker(conn, batch, k, dim, block_rows, rounds, num_local=0):
    """The independent floor's process: time every kernel (one warm-up round, then ``rounds``), report the
    fastest of each product, then answer each request with one timing of those three products (ms), and of the
    bank floor's passes when ``num_local`` (the shard's rows) is given."""
    floor = FloorProducts(batch, k, dim, block_rows)
    bank = BankPasses(num_local, k, dim) if num_local else None
    best = {p: {kernel: float("inf") for kernel in FLOOR_KERNELS[p]} for p in PRODUCTS}
    for done in range(rounds + 1):
        for product in PRODUCTS:
            for kernel in FLOOR_KERNELS[product]:
                seconds = floor.run(product, kernel)
                if done:
                    best[product][kernel] = min(best[product][kernel], seconds)
    kernels = {p: min(best[p], key=best[p].get) for p in PRODUCTS}
    conn.send({"kernels": kernels, "candidate_ms": {p: {kn: round(1000 * s, 2) for kn, s in best[p].items()}
                                                    for p in PRODUCTS}})
    while conn.recv():
        ms = {p: 1000.0 * floor.run(p, kernels[p]) for p in PRODUCTS}
        bank_ms = {name: 1000.0 * s for name, s in bank.run().items()} if bank is not None else {}
        conn.send((ms, bank_ms))


class FloorWorker:
    """The independent floor in a fresh process (spawned: no head, no Horovod), asked for one timing at a time."""

    def __init__(self, batch, k, dim, block_rows, rounds, num_local=0):
        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        self._proc = multiprocessing.get_context("spawn").Process(
            target=floor_worker, args=(child, batch, k, dim, block_rows, rounds, num_local), daemon=True)
        self._proc.start()
        child.close()
        self.info = self._receive()

    def _receive(self):
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError("the floor process died (exit code %s)" % self._proc.exitcode) from None

    def time_ms(self):
        """({product: ms}, {bank pass: ms}) of one timing (the second empty without a bank floor)."""
        self._conn.send(True)
        return self._receive()

    def close(self):
        try:
            self._conn.send(False)
        except OSError:
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._conn.close()
