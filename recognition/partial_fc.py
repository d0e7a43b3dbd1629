"""The Partial FC operator: sharded class centres, PPRN sampling, one exact margin softmax across ranks.

Rank r owns the contiguous class slice [class_start, class_start + num_local) of the centre matrix W (sizes
differ by at most one: no padded phantom classes). One training step, ``forward_backward``:

1. every rank's (batch size, embedding size, finiteness, label range) is gathered and checked, so bad input
   raises the same error on every rank before any rank waits in a collective;
2. embeddings and integer labels of the global batch are gathered (``hvd.allgather``);
3. each rank samples its positive centres plus uniform negatives (``sampler.PPRNSampler``) and pulls those rows
   from its memory bank;
4. cosine logits = normalised embeddings x normalised sampled centres; the combined margin goes on each target
   logit (``margin.CombinedMargin``); optional inter-class filtering drops negatives whose cosine exceeds a
   threshold (Partial FC v2);
5. softmax cross-entropy over the union of all ranks' samples: allreduce of the row max and of the row sum of
   exponentials (with each row's target term, which exactly one rank holds); the loss, the mean over the global
   batch, is identical on every rank;
6. backward: the embedding gradient is summed over ranks and scattered back (``hvd.reducescatter``), each rank
   receiving its own rows; the sampled centres' gradient is kept for ``update(lr)``, which applies SGD with
   momentum and weight decay to exactly those rows in the bank.

Two interchangeable kernel sets do steps 3-6: NumPy (host arrays, oneDNN ``FullyConnected`` for the logits;
the fastest on a CPU) and NDArray (everything on ``ctx``: what a GPU uses). ``kernels='auto'`` picks NumPy on a
CPU context and NDArray otherwise.
"""
import numpy as np
import mxnet as mx

from recognition import dist
from recognition.margin import CombinedMargin
from recognition.memory_bank import make_bank
from recognition.sampler import PPRNSampler

NORM_EPS = 1e-12
_NEG_INF = np.float32(-np.inf)


def l2_normalize_rows(a):
    """(a / ||a||, 1 / ||a||) row-wise, float32, with the norm floored at NORM_EPS."""
    inv = np.einsum("ij,ij->i", a, a)
    np.sqrt(inv, out=inv)
    np.maximum(inv, NORM_EPS, out=inv)
    np.divide(1.0, inv, out=inv)
    return a * inv[:, None], inv


def normalization_backward(unit, inv_norm, grad_unit):
    """Gradient w.r.t. a before normalisation, given unit = a/||a|| and d(loss)/d(unit): (g - u (u.g)) / ||a||."""
    dot = np.einsum("ij,ij->i", unit, grad_unit)
    out = grad_unit - unit * dot[:, None]
    out *= inv_norm[:, None]
    return out


class PartialFC:
    """Model-parallel, sampled margin-softmax head. See the module docstring for the algorithm.

    Public API: ``forward_backward(local_embeddings, local_labels) -> (loss, embedding_grad)``,
    ``update(lr)``, ``class_start``, ``num_local``, ``sampled_index``, ``weight``, ``weight_mom``.
    Horovod must be initialised by the caller (``hvd.init()``); a single process works without horovodrun.
    """

    def __init__(self, num_classes, embedding_size, sample_ratio=1.0, margins=(1.0, 0.5, 0.0), scale=64.0,
                 ctx=None, bank_location="device", interclass_filter=0.0, momentum=0.9, weight_decay=5e-4,
                 seed=0, easy_margin=False, kernels="auto", disk_dir=None):
        self.ctx = ctx or mx.cpu()
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.rank, self.world_size = dist.rank(), dist.size()
        if self.num_classes < self.world_size:
            raise ValueError("num_classes (%d) must be at least the world size (%d)"
                             % (self.num_classes, self.world_size))
        self.class_start, class_end = dist.shard_range(self.num_classes, self.world_size, self.rank)
        self.num_local = class_end - self.class_start
        self.scale = float(scale)
        self.margin = CombinedMargin(*margins, easy_margin=easy_margin)
        self.interclass_filter = float(interclass_filter)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        if kernels == "auto":
            kernels = "numpy" if self.ctx.device_type == "cpu" else "ndarray"
        if kernels not in ("numpy", "ndarray"):
            raise ValueError("kernels must be 'auto', 'numpy' or 'ndarray', got %r" % (kernels,))
        if kernels == "numpy" and self.ctx.device_type != "cpu":
            raise ValueError("the NumPy kernels run on a CPU context only, got %s" % (self.ctx,))
        self.kernels = kernels
        self.sampler = PPRNSampler(self.num_local, self.class_start, sample_ratio, seed)
        self.bank = make_bank(bank_location, self.ctx, self.num_local, self.embedding_size, self.class_start,
                              seed=seed, kernels=kernels, disk_dir=disk_dir)
        self.step = 0            # forward_backward calls so far: keys the sampler's random stream
        self._index = None       # local rows sampled in the last step (None: all rows)
        self._pending = None     # what update() needs from the last forward_backward

    # ----------------------------------------------------------------------------------------- public API
    @property
    def sampled_index(self):
        """Sorted local row ids of W used in the last step."""
        if self._index is None:
            return np.arange(self.num_local, dtype=np.int64)
        return self._index

    @property
    def num_sample(self):
        return self.sampler.num_sample

    @property
    def weight(self):
        """This rank's shard of W, (num_local, D), as a NumPy array."""
        return self.bank.weight

    @property
    def weight_mom(self):
        """The SGD momentum of this rank's shard, (num_local, D), as a NumPy array."""
        return self.bank.momentum

    def forward_backward(self, local_embeddings, local_labels):
        """Loss (Python float, mean over the global batch) and d(loss)/d(local_embeddings) (NDArray on ctx)."""
        x_local, y_local = self._checked_inputs(local_embeddings, local_labels)
        x = dist.allgather(x_local, name="pfc.embeddings")
        y = dist.allgather(y_local, name="pfc.labels")
        xn, x_inv = l2_normalize_rows(x)
        index, target_col = self.sampler.sample(y, self.step)
        self._index = index
        rows = self.bank.gather(index)
        head = self._head_numpy if self.kernels == "numpy" else self._head_ndarray
        loss, grad_xn = head(xn, rows, target_col)
        b = x_local.shape[0]
        own = slice(self.rank * b, (self.rank + 1) * b)
        grad_xn_local = dist.reducescatter_sum(grad_xn, name="pfc.embedding_grad")
        grad_x = normalization_backward(xn[own], x_inv[own], grad_xn_local)
        self.step += 1
        return loss, mx.nd.array(grad_x, ctx=self._output_ctx(local_embeddings), dtype="float32")

    def update(self, lr):
        """SGD-momentum step (learning rate ``lr``) on the centres sampled in the last forward_backward."""
        if self._pending is None:
            raise RuntimeError("PartialFC.update() needs a forward_backward() first (and only one update per step)")
        index, rows = self._pending["index"], self._pending["rows"]
        grad = self._centre_grad()
        self._pending = None
        self.bank.sgd_update(index, rows, grad, lr, self.momentum, self.weight_decay)

    def sampled_weight_grad(self):
        """d(loss)/d(W[sampled_index]) of the last step, (num_sample, D) NumPy (for tests and inspection)."""
        if self._pending is None:
            raise RuntimeError("no pending step: call forward_backward() first")
        grad = self._centre_grad()
        return grad.asnumpy() if isinstance(grad, mx.nd.NDArray) else grad.copy()

    # ------------------------------------------------------------------------------------------ checks
    def _checked_inputs(self, embeddings, labels):
        """Local inputs as (float32 (B, D), int64 (B,)) NumPy arrays, after an all-rank sanity check."""
        x = embeddings.asnumpy() if isinstance(embeddings, mx.nd.NDArray) else np.asarray(embeddings)
        y = labels.asnumpy() if isinstance(labels, mx.nd.NDArray) else np.asarray(labels)
        label_is_int = np.issubdtype(y.dtype, np.integer)
        y = y.reshape(-1)
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x)
        meta = np.array([[x.shape[0], x.shape[1] if x.ndim == 2 else -1, y.shape[0], int(label_is_int),
                          int(x.size - np.count_nonzero(finite)),
                          int(y.min()) if y.size and label_is_int else 0,
                          int(y.max()) if y.size and label_is_int else 0]], dtype=np.int64)
        every = dist.allgather(meta, name="pfc.meta")
        problems = []
        batch = int(every[0, 0])
        for r, (b, d, nl, is_int, nonfinite, lo, hi) in enumerate(every.tolist()):
            if b != batch:
                problems.append("rank %d has batch size %d but rank 0 has %d" % (r, b, batch))
            if d != self.embedding_size:
                problems.append("rank %d has embeddings of size %s, expected (B, %d)" % (r, d, self.embedding_size))
            if nl != b:
                problems.append("rank %d has %d labels for %d embeddings" % (r, nl, b))
            if not is_int:
                problems.append("rank %d passed non-integer labels (int32/int64 needed: float32 cannot hold "
                                "class ids above 2^24 exactly)" % r)
            if nonfinite:
                problems.append("rank %d has %d non-finite embedding values (NaN/inf)" % (r, nonfinite))
            if is_int and (lo < 0 or hi >= self.num_classes):
                bad = lo if lo < 0 else hi
                problems.append("rank %d has label %d outside [0, %d)" % (r, bad, self.num_classes))
        if problems:
            raise ValueError("PartialFC: bad input at step %d: %s" % (self.step, "; ".join(problems)))
        return x, y.astype(np.int64)

    def _output_ctx(self, embeddings):
        return embeddings.context if isinstance(embeddings, mx.nd.NDArray) else self.ctx

    # ---------------------------------------------------------------------------------- shared pieces
    def _target_terms(self, cos_t):
        """psi(cos) and d psi / d cos of the target entries held by this rank (float64)."""
        return self.margin(cos_t)

    def _softmax_stats(self, row_max_local, target_logit, has_target):
        """Global row max; then a closure that turns local row sums into (global sums, loss)."""
        row_max = dist.allreduce(row_max_local, name="pfc.row_max", op="max")

        def finish(row_sum_local):
            # one allreduce carries the row sums and the target terms (only the owning rank's is non-zero)
            target_term = np.where(has_target, target_logit - row_max.astype(np.float64), 0.0)
            packed = np.stack([row_sum_local.astype(np.float64), target_term])
            packed = dist.allreduce(packed, name="pfc.row_sum")
            row_sum, target_shifted = packed[0], packed[1]
            loss = float(np.mean(np.log(row_sum) - target_shifted))
            return row_sum, loss

        return row_max, finish

    # ------------------------------------------------------------------------------------ NumPy kernels
    def _head_numpy(self, xn, rows, target_col):
        wn, w_inv = l2_normalize_rows(rows)
        batch, k = xn.shape[0], wn.shape[0]
        logits = np.empty((batch, k), dtype=np.float32)
        out_nd = mx.nd.from_numpy(logits.view(), zero_copy=True)
        mx.nd.FullyConnected(mx.nd.array(xn), mx.nd.from_numpy(wn.view(), zero_copy=True),
                             no_bias=True, num_hidden=k, out=out_nd)
        out_nd.wait_to_read()
        del out_nd  # logits is ours again: the products below are in NumPy

        r = np.flatnonzero(target_col >= 0)
        c = target_col[r]
        psi, dpsi = self._target_terms(logits[r, c])
        if self.interclass_filter > 0:
            dirty = logits > self.interclass_filter
            dirty[r, c] = False
        logits[r, c] = psi
        if self.interclass_filter > 0:
            logits[dirty] = _NEG_INF
        row_max_local = logits.max(axis=1) * np.float32(self.scale)
        has_target = target_col >= 0
        target_logit = np.zeros(batch)
        target_logit[r] = self.scale * psi
        row_max, finish = self._softmax_stats(row_max_local, target_logit, has_target)
        # exp(s*cos - max) in place: logits becomes the unnormalised probabilities
        logits *= np.float32(self.scale)
        logits -= row_max[:, None].astype(np.float32)
        np.exp(logits, out=logits)
        row_sum, loss = finish(logits.sum(axis=1, dtype=np.float64))
        # d loss / d cos = s/B * (p - onehot), times psi' on the target entries
        logits *= (self.scale / batch / row_sum).astype(np.float32)[:, None]
        logits[r, c] -= np.float32(self.scale / batch)
        logits[r, c] *= dpsi.astype(np.float32)
        grad_cos = logits
        grad_xn = grad_cos @ wn
        self._pending = {"index": self._index, "rows": rows, "unit": wn, "inv_norm": w_inv,
                         "grad_cos": grad_cos, "xn": xn}
        return loss, grad_xn

    # ---------------------------------------------------------------------------------- NDArray kernels
    def _head_ndarray(self, xn, rows, target_col):
        ctx = self.ctx
        rows_nd = rows if isinstance(rows, mx.nd.NDArray) else mx.nd.array(rows, ctx=ctx)  # host bank: copy in
        norm = mx.nd.sqrt(mx.nd.sum(rows_nd * rows_nd, axis=1))
        w_inv = 1.0 / mx.nd.maximum(norm, NORM_EPS)
        wn = mx.nd.broadcast_mul(rows_nd, w_inv.expand_dims(1))
        xn_nd = mx.nd.array(xn, ctx=ctx)
        batch, k = xn.shape[0], wn.shape[0]
        cos = mx.nd.FullyConnected(xn_nd, wn, no_bias=True, num_hidden=k)
        has_target = target_col >= 0
        col = mx.nd.array(np.where(has_target, target_col, 0), ctx=ctx, dtype="int64")
        onehot = mx.nd.one_hot(mx.nd.array(target_col, ctx=ctx, dtype="int64"), k)  # -1 -> a zero row
        cos_t = mx.nd.pick(cos, col, axis=1).asnumpy().astype(np.float64)
        psi, dpsi = self._target_terms(cos_t)
        psi = np.where(has_target, psi, 0.0)
        dpsi = np.where(has_target, dpsi, 1.0)
        shift = mx.nd.array((psi - np.where(has_target, cos_t, 0.0)).astype(np.float32), ctx=ctx)
        z = cos + mx.nd.broadcast_mul(onehot, shift.expand_dims(1))
        if self.interclass_filter > 0:
            dirty = (cos > self.interclass_filter) * (1 - onehot)
            z = mx.nd.where(dirty, mx.nd.full(z.shape, -np.inf, ctx=ctx), z)
        z = z * self.scale
        target_logit = self.scale * psi
        row_max, finish = self._softmax_stats(mx.nd.max(z, axis=1).asnumpy(), target_logit, has_target)
        e = mx.nd.exp(mx.nd.broadcast_sub(z, mx.nd.array(row_max, ctx=ctx).expand_dims(1)))
        row_sum, loss = finish(mx.nd.sum(e, axis=1).asnumpy().astype(np.float64))
        p = mx.nd.broadcast_mul(e, mx.nd.array((self.scale / batch / row_sum).astype(np.float32),
                                               ctx=ctx).expand_dims(1))
        grad_cos = p - onehot * (self.scale / batch)
        chain = mx.nd.array(dpsi.astype(np.float32) - 1.0, ctx=ctx).expand_dims(1)
        grad_cos = grad_cos * (1 + mx.nd.broadcast_mul(onehot, chain))
        grad_xn = mx.nd.dot(grad_cos, wn).asnumpy()
        self._pending = {"index": self._index, "rows": rows, "unit": wn, "inv_norm": w_inv,
                         "grad_cos": grad_cos, "xn": xn_nd}
        return loss, grad_xn

    def _centre_grad(self):
        """d(loss)/d(sampled rows) from the pending step, in the bank's native array kind."""
        p = self._pending
        if self.kernels == "numpy":
            grad_unit = p["grad_cos"].T @ p["xn"]
            return normalization_backward(p["unit"], p["inv_norm"], grad_unit)
        grad_unit = mx.nd.dot(p["grad_cos"], p["xn"], transpose_a=True)
        dot = mx.nd.sum(p["unit"] * grad_unit, axis=1, keepdims=True)
        grad = mx.nd.broadcast_mul(grad_unit - mx.nd.broadcast_mul(p["unit"], dot), p["inv_norm"].expand_dims(1))
        if self.bank.native == "numpy":
            return grad.asnumpy()
        return grad
