"""The Partial FC operator: sharded class centres, PPRN sampling, one exact margin softmax across ranks.

Rank r owns the contiguous class slice [class_start, class_start + num_local) of the centre matrix W (sizes
differ by at most one: no padded phantom classes). One training step, ``forward_backward``:

1. embeddings and integer labels of the global batch are gathered (one ``hvd.allgather``, labels bit-exact)
   together with each rank's shapes and finiteness, and checked on every rank, so bad input raises the same
   error on every rank and no rank is left waiting in a later collective; label ``IGNORE_LABEL`` (-1) marks a
   row that takes no part in the loss (the padding of an epoch's last batch);
2. each rank samples its positive centres plus uniform negatives (``sampler.PPRNSampler``) and pulls those rows
   from its memory bank;
3. cosine logits = normalised embeddings x normalised sampled centres; the combined margin goes on each target
   logit (``margin.CombinedMargin``); optional inter-class filtering (Partial FC v2) sets a negative whose cosine
   exceeds a threshold to cosine 0, as the reference implementation (arcface_torch's ``CombinedMarginLoss``)
   does: it gets no gradient but still counts in the softmax denominator;
4. softmax cross-entropy over the union of all ranks' samples: each rank's row max, row sum of exponentials
   and target term (exactly one rank holds a row's target) are combined exactly in one collective (see
   ``_softmax_stats``); the loss, the mean over the global batch's labelled rows, is identical on every rank;
5. backward: the embedding gradient is summed over ranks and scattered back (``hvd.reducescatter``), each rank
   receiving its own rows; the sampled centres' gradient is kept for ``update(lr)``, which applies SGD with
   momentum and weight decay to exactly those rows in the bank.

Two interchangeable kernel sets do steps 2-5: NumPy (host arrays; every matrix product through MXNet's oneDNN
``FullyConnected``, never numpy's BLAS, see ``products.py``) and NDArray (everything on ``ctx``: what a GPU uses).
``kernels='auto'`` picks NumPy on a CPU context and NDArray otherwise.

Pipelined bank I/O (``pipeline=True``): the bank's pulls and pushes run on one ordered worker thread
(``bank_queue.BankQueue``). ``prepare(labels)`` gathers the step's labels (a small collective), samples and
starts the pull, so it runs while the caller's backbone computes the embeddings; ``update(lr)`` queues the centre
gradient and the push and returns at once. The next pull queues behind that push, so a row sampled by two
consecutive steps is never read before its update is written: the parameters are bit-identical to the
sequential mode (``pipeline=False``), which runs every job on the caller's thread when it is asked for. A bank
job that fails is reported by the next ``forward_backward`` on every rank (its input header carries the flag),
so no rank is left waiting in a collective.
"""
from collections import defaultdict

import numpy as np
import mxnet as mx

from recognition import dist
from recognition.progress import PhaseClock
from recognition.partial_fc import products
from recognition.partial_fc.bank_queue import BankQueue
from recognition.partial_fc.cpu_kernels import (Workspace, l2_normalize_rows, normalization_backward,
                                                transpose_columns)
from recognition.partial_fc.margin import CombinedMargin
from recognition.partial_fc.memory_bank import make_bank
from recognition.partial_fc.sampler import PPRNSampler

IGNORE_LABEL = -1   # a row with this label is ignored: no loss, zero gradient, samples no centre
META_FIELDS = 6      # int64 header fields of each rank's input segment (see _gather_inputs)
# floats per block of the CPU centre-gradient + update pass: 8 MB stays in the last-level cache between its
# product and its update, and blocks this large keep oneDNN's per-call overhead small
UPDATE_BLOCK_FLOATS = 1 << 21
# block gradients in flight between the update's products and the bank thread: the disk bank's blocks wait for
# their write-back (I/O), so more of them may queue there (8 MB each)
UPDATE_BUFFERS = {"device": 3, "host": 3, "disk": 8}


_BANK_FAILED, _LABELS_CHANGED = 1, 2     # bits of the input header's flags field


def _labels_int64(labels):
    """(labels as a flat int64 NumPy array, whether they were integers); non-integer labels come back as zeros."""
    y = labels.asnumpy() if isinstance(labels, mx.nd.NDArray) else np.asarray(labels)
    is_int = np.issubdtype(y.dtype, np.integer)
    return (y.reshape(-1).astype(np.int64) if is_int else np.zeros(y.size, np.int64)), bool(is_int)


class PartialFC:
    """Model-parallel, sampled margin-softmax head. See the module docstring for the algorithm.

    Public API: ``forward_backward(local_embeddings, local_labels) -> (loss, embedding_grad)``,
    ``update(lr)``, ``prepare(local_labels)`` and ``flush()`` (pipelined mode), ``class_start``, ``num_local``,
    ``sampled_index``, ``weight``, ``weight_mom``.
    Horovod must be initialised by the caller (``hvd.init()``); a single process works without horovodrun.
    """

    def __init__(self, num_classes, embedding_size, sample_ratio=1.0, margins=(1.0, 0.5, 0.0), scale=64.0,
                 ctx=None, bank_location="device", interclass_filter=0.0, momentum=0.9, weight_decay=5e-4,
                 seed=0, easy_margin=False, kernels="auto", disk_dir=None, pipeline=False):
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
        self._prepared = None    # (global labels, index, target_col, pull future, local labels) from prepare()
        self._bank_jobs = BankQueue(threaded=pipeline)
        self._update_buffers = UPDATE_BUFFERS.get(bank_location, 3)
        self._workspace = Workspace()
        self._push_workspace = Workspace()   # the update's blocks (it may run on the bank thread)
        self.timings = defaultdict(float)   # seconds per phase, accumulated (benchmarks and logs read it)

    # ----------------------------------------------------------------------------------------- public API
    @property
    def pipelined(self):
        return self._bank_jobs.threaded

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
        """This rank's shard of W, (num_local, D), as a NumPy array (after every queued update)."""
        self._bank_jobs.drain()
        return self.bank.weight

    @property
    def weight_mom(self):
        """The SGD momentum of this rank's shard, (num_local, D), as a NumPy array (after every queued update)."""
        self._bank_jobs.drain()
        return self.bank.momentum

    def prepare(self, local_labels):
        """Start a step before its embeddings exist: gather every rank's labels (one small allgather), sample
        this rank's centres and queue their pull. ``forward_backward`` with the same labels must follow.

        Bad labels raise the same ValueError on every rank, as in ``forward_backward``.
        """
        y_local, is_int = _labels_int64(local_labels)
        every = dist.allgather(np.concatenate([np.array([y_local.size, int(is_int)], np.int64), y_local]),
                               name="pfc.labels")
        ys, problems, offset = [], [], 0
        for r in range(self.world_size):
            count, is_int = every[offset:offset + 2].tolist()
            ys.append(every[offset + 2:offset + 2 + count])
            offset += 2 + count
            problems += self._label_problems(r, ys[-1], is_int)
        if problems:
            raise ValueError("PartialFC: bad input at step %d: %s" % (self.step, "; ".join(problems)))
        y = np.concatenate(ys)
        index, target_col = self.sampler.sample(y, self.step)
        pull = self._bank_jobs.submit("pull step %d" % self.step, self._pull, index)
        self._prepared = (y, index, target_col, pull, y_local)

    def forward_backward(self, local_embeddings, local_labels):
        """Loss (Python float, mean over the global batch's rows whose label is not IGNORE_LABEL; 0.0 when every
        row is ignored) and d(loss)/d(local_embeddings) (NDArray on ctx; zero on ignored rows)."""
        clock = PhaseClock(self.timings)
        prepared, self._prepared = self._prepared, None
        flags, bank_error, pulled = 0, None, None
        try:    # a failed bank job is reported to every rank through the input header, never raised alone
            if prepared is not None:
                pulled = self._bank_jobs.wait(prepared[3])
            else:
                self._bank_jobs.drain()
        except Exception as err:    # noqa: BLE001 - any failure of the bank thread
            flags, bank_error = flags | _BANK_FAILED, err
        clock.tick("bank_pull")
        if prepared is not None and not np.array_equal(_labels_int64(local_labels)[0], prepared[4]):
            flags |= _LABELS_CHANGED
        x_local, x, y = self._gather_inputs(local_embeddings, local_labels, flags, bank_error)
        xn, x_inv = l2_normalize_rows(x)
        clock.tick("gather")
        if prepared is None:
            index, target_col = self.sampler.sample(y, self.step)
            clock.tick("sample")
            pulled = self._bank_jobs.wait(self._bank_jobs.submit("pull step %d" % self.step, self._pull, index))
            clock.tick("bank_pull")
        else:
            index, target_col = prepared[1], prepared[2]
        self._index = index
        unit, inv_norm = pulled
        head = self._head_numpy if self.kernels == "numpy" else self._head_ndarray
        loss, grad_xn = head(xn, unit, inv_norm, target_col, y != IGNORE_LABEL, clock)
        b = x_local.shape[0]
        own = slice(self.rank * b, (self.rank + 1) * b)
        grad_xn_local = dist.reducescatter_sum(grad_xn, name="pfc.embedding_grad")
        grad_x = normalization_backward(xn[own], x_inv[own], grad_xn_local)
        self.step += 1
        clock.tick("gather")
        return loss, mx.nd.array(grad_x, ctx=self._output_ctx(local_embeddings), dtype="float32")

    def update(self, lr):
        """SGD-momentum step (learning rate ``lr``) on the centres sampled in the last forward_backward.

        Pipelined, the bank's share (the SGD step and the write-back of each block of rows) is queued on the bank
        thread; this returns once the centre gradient's products are done."""
        if self._pending is None:
            raise RuntimeError("PartialFC.update() needs a forward_backward() first (and only one update per step)")
        pending, self._pending = self._pending, None
        if self.kernels == "numpy":
            self._update_blocked(pending, float(lr))
        else:
            self._bank_jobs.submit("update step %d" % (self.step - 1), self._update_ndarray, pending, float(lr))

    def flush(self, agree=False):
        """Wait for every queued bank job. ``agree=True`` (a collective: every rank must call it) makes every rank
        raise when any rank's bank failed, not only that rank."""
        error = None
        try:
            self._bank_jobs.drain()
        except Exception as err:    # noqa: BLE001
            error = err
        if agree and int(dist.allreduce(np.array([error is not None], np.int32), name="pfc.flush", op="max")[0]):
            raise error or RuntimeError("PartialFC: the memory bank failed on another rank (see its output)")
        if error is not None:
            raise error

    def close(self):
        """Finish the queued bank jobs and stop the bank thread."""
        try:
            self._bank_jobs.drain()
        finally:
            self._bank_jobs.close()

    def _pull(self, index):
        return self.bank.pull(index)

    def _update_blocked(self, p, lr):
        """The centre gradient a block of rows at a time, here (its products go through MXNet's engine, which the
        next step's forward will keep busy); each block's SGD step and write-back is a bank job, which the bank
        thread runs while the next block's product and then the next forward run. A few block buffers take turns
        (UPDATE_BUFFERS), so a block's gradient is still in cache when its job reads it."""
        clock = PhaseClock(self.timings)
        grad_logits, index, inv_norm = p["grad_logits"], p["index"], p["inv_norm"]
        (batch, k), dim = grad_logits.shape, p["x_scaled"].shape[1]
        x_t = products.transposed_nd(p["x_scaled"])
        rows = max(1, UPDATE_BLOCK_FLOATS // dim)
        jobs = [None] * self._update_buffers
        for n, lo in enumerate(range(0, k, rows)):
            hi, slot = min(lo + rows, k), n % len(jobs)
            if jobs[slot] is not None:
                jobs[slot].exception()      # its buffer is free again (a failure is reported by the next step)
                clock.tick("bank_push")
            block_t = transpose_columns(grad_logits, lo, hi, self._push_workspace.get("grad_t", (rows, batch)))
            grad_unit = products.rows_times(block_t, x_t,
                                            self._push_workspace.get("grad_block%d" % slot, (hi - lo, dim)))
            clock.tick("centre_gemm")
            jobs[slot] = self._bank_jobs.submit("update step %d, rows %d-%d" % (self.step - 1, lo, hi),
                                                self._push_block, index, lo, hi, grad_unit, inv_norm, lr)
            clock.tick("bank_push")

    def _push_block(self, index, lo, hi, grad_unit, inv_norm, lr):
        self.bank.apply_grad(None if index is None else index[lo:hi], grad_unit, inv_norm[lo:hi], lr,
                             self.momentum, self.weight_decay, offset=lo)

    def _update_ndarray(self, p, lr):
        clock = PhaseClock(self.timings)
        grad_unit = self._unit_grad(p)
        clock.tick("centre_gemm")
        self.bank.apply_grad(p["index"], grad_unit, p["inv_norm"], lr, self.momentum, self.weight_decay)
        clock.tick("bank_push")

    def sampled_weight_grad(self):
        """d(loss)/d(W[sampled_index]) of the last step, (num_sample, D) NumPy (for tests and inspection)."""
        if self._pending is None:
            raise RuntimeError("no pending step: call forward_backward() first")
        p = self._pending
        grad_unit, unit, inv_norm = self._unit_grad(p), p["unit"], p["inv_norm"]
        if isinstance(grad_unit, mx.nd.NDArray):
            grad_unit, unit, inv_norm = grad_unit.asnumpy(), unit.asnumpy(), inv_norm.asnumpy()
        return normalization_backward(np.asarray(unit), np.asarray(inv_norm), grad_unit)

    # ------------------------------------------------------------------------------------------ checks
    def _label_problems(self, r, labels, is_int):
        """What is wrong with rank r's labels (int64 array; ``is_int``: were they integers), as messages."""
        if not is_int:
            return ["rank %d passed non-integer labels (int32/int64 needed: float32 cannot hold class ids above "
                    "2^24 exactly)" % r]
        if labels.size:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < IGNORE_LABEL or hi >= self.num_classes:
                return ["rank %d has label %d outside [0, %d) (%d marks an ignored row)"
                        % (r, lo if lo < IGNORE_LABEL else hi, self.num_classes, IGNORE_LABEL)]
        return []

    def _gather_inputs(self, embeddings, labels, flags=0, bank_error=None):
        """Gather every rank's embeddings and labels with ONE allgather, then check them on every rank.

        Each rank sends a self-describing flat float32 segment: a header of META_FIELDS int64 values (batch
        size, embedding size, label count, labels-are-integers, non-finite count, flags: its bank failed / its
        labels differ from ``prepare``'s), then its int64 labels and its embeddings, all bit-cast (the collective
        copies bytes; no arithmetic touches them). Segments may differ in length, so shape mismatches still
        arrive, and every rank reads the same problems and raises the same error: no rank is left waiting in a
        later collective. Returns (x_local, x_global, y_global).
        """
        x = embeddings.asnumpy() if isinstance(embeddings, mx.nd.NDArray) else np.asarray(embeddings)
        y, label_is_int = _labels_int64(labels)
        x = np.ascontiguousarray(x, dtype=np.float32)
        header = np.array([x.shape[0] if x.ndim else 0, x.shape[1] if x.ndim == 2 else -1, y.size,
                           int(label_is_int), x.size - np.count_nonzero(np.isfinite(x)), flags], dtype=np.int64)
        segment = np.concatenate([header.view(np.float32), y.view(np.float32), x.reshape(-1)])
        every = dist.allgather(segment, name="pfc.inputs")
        xs, ys, failures, problems, offset = [], [], [], [], 0
        for r in range(self.world_size):
            b, d, nl, is_int, nonfinite, rank_flags = every[offset:offset + 2 * META_FIELDS].view(np.int64).tolist()
            offset += 2 * META_FIELDS
            ys.append(every[offset:offset + 2 * nl].view(np.int64))
            offset += 2 * nl
            n = b * d if d >= 0 else b
            xs.append(every[offset:offset + n])
            offset += n
            if r == 0:
                batch = b
            if rank_flags & _BANK_FAILED:
                failures.append("rank %d's memory bank failed (%s)" % (
                    r, "%s: %s" % (type(bank_error).__name__, bank_error) if r == self.rank else "see its output"))
            if rank_flags & _LABELS_CHANGED:
                problems.append("rank %d passed labels that differ from the ones it gave prepare()" % r)
            if b != batch:
                problems.append("rank %d has batch size %d but rank 0 has %d" % (r, b, batch))
            if d != self.embedding_size:
                problems.append("rank %d has embeddings of size %s, expected (B, %d)" % (r, d, self.embedding_size))
            if nl != b:
                problems.append("rank %d has %d labels for %d embeddings" % (r, nl, b))
            if nonfinite:
                problems.append("rank %d has %d non-finite embedding values (NaN/inf)" % (r, nonfinite))
            problems += self._label_problems(r, ys[-1], is_int)
        if failures:
            raise RuntimeError("PartialFC: step %d cannot run: %s" % (self.step, "; ".join(failures)))
        if problems:
            raise ValueError("PartialFC: bad input at step %d: %s" % (self.step, "; ".join(problems)))
        x_global = np.concatenate(xs).reshape(-1, self.embedding_size)
        return x, x_global, np.concatenate(ys)

    def _output_ctx(self, embeddings):
        return embeddings.context if isinstance(embeddings, mx.nd.NDArray) else self.ctx

    # ---------------------------------------------------------------------------------- shared pieces
    def _target_terms(self, cos_t):
        """psi(cos) and d psi / d cos of the target entries held by this rank (float64)."""
        return self.margin(cos_t)

    def _softmax_stats(self, row_max_local, row_sum_local, target_logit, has_target, labelled):
        """Combine the ranks' partial softmax statistics with one allgather; return (row factor, loss, rows).

        Rank r exponentiated its logits z with its own row max m_r: S_r = sum_j exp(z_j - m_r). With
        M = max_r m_r, the global sum is T = sum_r S_r exp(m_r - M), the loss of a row M + log T - z_target
        (the target logit sits on exactly one rank), and p_j = exp(z_j - m_r) * exp(m_r - M) / T: this rank's
        factor. (The same as allreducing the max, then the sums, with one synchronisation instead of two.)
        ``labelled`` (every rank knows every label) keeps ignored rows out of the loss, and their factor is 0;
        ``rows`` is the number of labelled rows, the mean's denominator (at least 1).
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

    # ------------------------------------------------------------------------------------ NumPy kernels
    def _head_numpy(self, xn, wn, w_inv, target_col, labelled, clock):
        """Logits z = s * cos straight from the product (the scale rides on the (B, D) embeddings), softmax of
        each row by oneDNN, gradients with respect to z; see ``products.py`` for the layouts."""
        batch, k = xn.shape[0], wn.shape[0]
        scale = np.float32(self.scale)
        x_scaled = xn * scale
        logits = self._workspace.get("logits", (batch, k))
        product = products.LogitsProduct(x_scaled, wn, logits)
        clock.tick("logits_gemm")

        r = np.flatnonzero(target_col >= 0)     # the global rows whose class this rank holds
        c = target_col[r]
        psi, dpsi = self._target_terms(logits[r, c].astype(np.float64) / self.scale)
        dirty = None
        if self.interclass_filter > 0:      # negatives above the threshold: cosine 0 (see the module docstring)
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
        factor, loss, rows = self._softmax_stats(row_max.astype(np.float64), row_sum,
                                                 target_logit, has_target, labelled)
        clock.tick("softmax_sync")
        # d loss / d z = (p - onehot) / B (B: labelled rows; ignored rows have factor 0), times psi' on targets;
        # p = this rank's p_j * S * factor; a filtered entry is a constant: no gradient
        logits *= (factor * row_sum / rows).astype(np.float32)[:, None]
        logits[r, c] -= np.float32(1.0 / rows)
        logits[r, c] *= dpsi.astype(np.float32)
        if dirty is not None:
            logits[dirty] = 0.0
        clock.tick("softmax")
        grad_xn = product.data_grad()
        grad_xn *= scale                        # z = (s x) . w: d loss / d x = s * d loss / d (s x)
        clock.tick("embedding_gemm")
        self._pending = {"index": self._index, "unit": wn, "inv_norm": w_inv, "grad_logits": logits,
                         "x_scaled": x_scaled}
        return loss, grad_xn

    # ---------------------------------------------------------------------------------- NDArray kernels
    def _head_ndarray(self, xn, unit, inv_norm, target_col, labelled, clock):
        ctx = self.ctx
        wn = unit if isinstance(unit, mx.nd.NDArray) else mx.nd.array(unit, ctx=ctx)  # host bank: copy in
        xn_nd = mx.nd.array(xn, ctx=ctx)
        k = wn.shape[0]
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
        kept = None
        if self.interclass_filter > 0:      # negatives above the threshold: cosine 0, no gradient
            kept = 1 - (cos > self.interclass_filter) * (1 - onehot)
            z = z * kept
        z = z * self.scale
        target_logit = self.scale * psi
        row_max = mx.nd.max(z, axis=1).asnumpy().astype(np.float64)    # float32 values: the shift's precision
        e = mx.nd.exp(mx.nd.broadcast_sub(z, mx.nd.array(row_max, ctx=ctx).expand_dims(1)))
        factor, loss, rows = self._softmax_stats(row_max, mx.nd.sum(e, axis=1).asnumpy(), target_logit, has_target,
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
        self._pending = {"index": self._index, "unit": unit, "inv_norm": inv_norm, "grad_cos": grad_cos,
                         "xn": xn_nd}
        return loss, grad_xn

    def _unit_grad(self, p):
        """d(loss)/d(normalised sampled rows) = grad_logits^T . (s xn), in the bank's native array kind."""
        if self.kernels == "numpy":
            grad_logits, x_scaled = p["grad_logits"], p["x_scaled"]
            (batch, k), dim = grad_logits.shape, x_scaled.shape[1]
            grad_t = transpose_columns(grad_logits, 0, k, np.empty((k, batch), np.float32))
            return products.rows_times(grad_t, products.transposed_nd(x_scaled), np.empty((k, dim), np.float32))
        grad_unit = mx.nd.dot(p["grad_cos"], p["xn"], transpose_a=True)
        return grad_unit.asnumpy() if self.bank.native == "numpy" else grad_unit
