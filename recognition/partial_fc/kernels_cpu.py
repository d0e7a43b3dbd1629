"""Partial FC's CPU kernel set: NumPy arrays on the host; each matrix product runs the kernel (oneDNN, MXNet's
``nd.dot`` or numpy's BLAS, ``products.py``) that the first step found fastest on this CPU (``product_choice.py``).

The products multiply the bank's raw rows W (``bank_contract.RawRowBank``): z = s * cos is (s x) . w times
1/||w||, one pass over the (B, k) logits (B is the batch, far smaller than D rows of W), so no normalised copy
of the sampled rows is ever written, and at sample ratio 1.0 the products read the bank itself. The logits are
laid out batch-major (B, k), the scale folded into the embeddings, so oneDNN's softmax runs along contiguous
rows. The gradient G' = (d loss / d z) scaled by 1/||w|| per column gives both d loss / d (s x) = G' . W and
h = G'^T . (s x) = (d loss / d unit row) / ||w||, what the bank's ``apply_scaled_grad`` takes. The centre
gradient and update go a block of rows at a time: each block's product runs here, its SGD step and write-back
is a bank job, which the bank thread runs while the next block's product (and then the next step's forward) run.
"""
import numpy as np

from recognition.common.rows import Workspace
from recognition.partial_fc import cpu_kernels, product_choice, products
from recognition.partial_fc.bank_contract import RawRowBank
from recognition.partial_fc.kernels import HeadKernels, softmax_stats
from recognition.progress import PhaseClock

# floats per block of the centre-gradient + update pass: 8 MB stays in the last-level cache between its product
# and its update, and blocks this large keep oneDNN's per-call overhead small
UPDATE_BLOCK_FLOATS = 1 << 21
# block gradients in flight between the update's products and the bank thread: the disk bank's blocks wait for
# their write-back (I/O), so more of them may queue there (8 MB each)
UPDATE_BUFFERS = {"device": 3, "host": 3, "disk": 8}


class CPUKernels(HeadKernels):
    """See ``kernels.HeadKernels``; ``timings`` gets the seconds of the update's phases. ``cpu_products``: a
    ``PFC_CPU_PRODUCTS`` value (None: the environment's); ``choice`` holds the products' kernels after the first
    step (``product_choice.ProductChoice``)."""

    def __init__(self, ctx, bank_location="device", timings=None, cpu_products=None, **kwargs):
        super().__init__(ctx, **kwargs)
        self.timings = timings
        self.choice = None
        # a bad setting fails here, before any collective, not at the first step
        self._candidates = product_choice.resolve(cpu_products)
        if not isinstance(self.bank, RawRowBank):
            raise TypeError("the CPU kernels need a bank of raw rows in host memory (HostBank, DiskBank), got %s"
                            % type(self.bank).__name__)
        self._update_buffers = UPDATE_BUFFERS.get(bank_location, 3)
        self._workspace = Workspace()
        self._push_workspace = Workspace()   # the update's blocks (their jobs run on the bank thread)

    def pull(self, index):
        return self.bank.pull_raw(index)

    def forward_backward(self, xn, w, w_inv, index, target_col, labelled, clock):
        """Logits z = s * cos: the product of the scaled embeddings and the raw rows ``w``, each column times its
        1/||w||; softmax of each row by oneDNN, gradients with respect to z; see ``products.py`` for the
        layouts."""
        batch, k = xn.shape[0], w.shape[0]
        scale = np.float32(self.scale)
        x_scaled = xn * scale
        logits = self._workspace.get("logits", (batch, k))
        if self.choice is None:         # the first step: time the products' kernels on its operands
            logits.fill(0.0)            # the centre blocks are timed on this buffer: its pages, not the zero page
            self.choice = product_choice.choose(x_scaled, w, max(1, UPDATE_BLOCK_FLOATS // xn.shape[1]),
                                                self._candidates, grad=logits)
            clock.tick("product_choice")
        product = products.LogitsProduct(x_scaled, w, logits, self.choice["logits"], self.choice["embedding"])
        clock.tick("logits_gemm")
        cpu_kernels.scale_columns(logits, w_inv)
        clock.tick("softmax")

        r = np.flatnonzero(target_col >= 0)     # the global rows whose class this rank holds
        c = target_col[r]
        psi, dpsi = self.margin(logits[r, c].astype(np.float64) / self.scale)
        dirty = None
        if self.interclass_filter > 0:      # negatives above the threshold: cosine 0 (see HeadKernels)
            dirty = logits > scale * np.float32(self.interclass_filter)
            dirty[r, c] = False
            logits[dirty] = 0.0
        logits[r, c] = self.scale * psi
        top = logits.argmax(axis=1)
        every = np.arange(batch)
        row_max = logits[every, top]
        products.softmax_rows(logits)           # this rank's p_j = exp(z_j - m) / S, S = 1 / p_max
        row_sum = 1.0 / logits[every, top].astype(np.float64)
        clock.tick("softmax")
        has_target = target_col >= 0
        target_logit = np.zeros(batch)
        target_logit[r] = self.scale * psi
        factor, loss, rows = softmax_stats(row_max.astype(np.float64), row_sum, target_logit, has_target, labelled)
        clock.tick("softmax_sync")
        # d loss / d z = (p - onehot) / B (B: labelled rows; ignored rows have factor 0), times psi' on targets;
        # p = this rank's p_j * S * factor; a filtered entry is a constant: no gradient. Each column also gets
        # its 1/||w|| (G', see the module docstring)
        cpu_kernels.scale_columns(logits, w_inv, (factor * row_sum / rows).astype(np.float32))
        logits[r, c] = (logits[r, c] - w_inv[c] / np.float32(rows)) * dpsi.astype(np.float32)
        if dirty is not None:
            logits[dirty] = 0.0
        clock.tick("softmax")
        grad_xn = product.data_grad()
        grad_xn *= scale                        # z = (s x) . w: d loss / d x = s * d loss / d (s x)
        clock.tick("embedding_gemm")
        self.pending = {"index": index, "rows": w, "inv_norm": w_inv, "grad_logits": logits, "x_scaled": x_scaled}
        return loss, grad_xn

    def update(self, lr, step):
        """h = G'^T . (s x), a block of rows at a time, here (its products go through MXNet's engine, which the
        next step's forward will keep busy); each block's SGD step and write-back is a bank job. A few block
        buffers take turns (UPDATE_BUFFERS), so a block's gradient is still in cache when its job reads it."""
        p, self.pending = self.pending, None
        clock = PhaseClock(self.timings)
        grad_logits, index, inv_norm = p["grad_logits"], p["index"], p["inv_norm"]
        (batch, k), dim = grad_logits.shape, p["x_scaled"].shape[1]
        centre = products.CentreProduct(p["x_scaled"], self.choice["centre"])
        rows = max(1, UPDATE_BLOCK_FLOATS // dim)
        jobs = [None] * self._update_buffers
        for n, lo in enumerate(range(0, k, rows)):
            hi, slot = min(lo + rows, k), n % len(jobs)
            if jobs[slot] is not None:
                jobs[slot].exception()      # its buffer is free again (a failure is reported by the next step)
                clock.tick("bank_push")
            grad_scaled = centre.block(grad_logits, lo, hi, self._push_workspace.get("grad_t", (rows, batch)),
                                       self._push_workspace.get("grad_block%d" % slot, (hi - lo, dim)))
            clock.tick("centre_gemm")
            jobs[slot] = self.bank_jobs.submit("update step %d, rows %d-%d" % (step, lo, hi), self._push_block,
                                               index, lo, hi, grad_scaled, inv_norm, lr)
            clock.tick("bank_push")

    def _push_block(self, index, lo, hi, grad_scaled, inv_norm, lr):
        self.bank.apply_scaled_grad(None if index is None else index[lo:hi], grad_scaled, inv_norm[lo:hi], lr,
                                    self.momentum, self.weight_decay, offset=lo)

    def centre_grad(self):
        p = self.pending
        grad_logits, x_scaled, w = p["grad_logits"], p["x_scaled"], p["rows"]
        (batch, k), dim = grad_logits.shape, x_scaled.shape[1]
        centre = products.CentreProduct(x_scaled, self.choice["centre"])
        h = centre.block(grad_logits, 0, k, np.empty((k, batch), np.float32), np.empty((k, dim), np.float32))
        inv = np.asarray(p["inv_norm"], np.float32)[:, None]
        return h - w * (inv * inv * np.sum(w * h, axis=1, keepdims=True))
