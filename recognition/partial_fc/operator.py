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

Two interchangeable kernel sets do steps 3-5 (``kernels.py``): NumPy arrays with each matrix product in the
kernel found fastest on this CPU (``kernels_cpu.py``, the CPU's) and NDArrays on ``ctx`` (``kernels_ndarray.py``,
what a GPU uses).
``kernels='auto'`` picks NumPy on a CPU context and NDArray otherwise. The input protocol of step 1 is shared
with FFC (``recognition.common.collective_input``).

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

from recognition.common.collective_input import LocalInput, exchange, input_problems, raise_problems
from recognition.common.margin import CombinedMargin
from recognition.common.rows import l2_normalize_rows, normalization_backward
from recognition import dist
from recognition.partial_fc.bank_queue import BankQueue
from recognition.partial_fc.kernels_cpu import CPUKernels
from recognition.partial_fc.kernels_ndarray import NDArrayKernels
from recognition.partial_fc.memory_bank import make_bank
from recognition.partial_fc.sampler import PPRNSampler
from recognition.progress import PhaseClock

IGNORE_LABEL = -1   # a row with this label is ignored: no loss, zero gradient, samples no centre
KERNELS = {"numpy": CPUKernels, "ndarray": NDArrayKernels}
_BANK_FAILED, _LABELS_CHANGED = 1, 2     # bits of the flags each rank sends with its inputs


class PartialFC:
    """Model-parallel, sampled margin-softmax head. See the module docstring for the algorithm.

    Public API: ``forward_backward(local_embeddings, local_labels) -> (loss, embedding_grad)``,
    ``update(lr)``, ``prepare(local_labels)`` and ``flush()`` (pipelined mode), ``close()``, ``class_start``,
    ``num_local``, ``sampled_index``, ``weight``, ``weight_mom``.
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
        if kernels == "auto":
            kernels = "numpy" if self.ctx.device_type == "cpu" else "ndarray"
        if kernels not in KERNELS:
            raise ValueError("kernels must be 'auto', 'numpy' or 'ndarray', got %r" % (kernels,))
        if kernels == "numpy" and self.ctx.device_type != "cpu":
            raise ValueError("the NumPy kernels run on a CPU context only, got %s" % (self.ctx,))
        self.kernels = kernels
        self.sampler = PPRNSampler(self.num_local, self.class_start, sample_ratio, seed)
        self.bank = make_bank(bank_location, self.ctx, self.num_local, self.embedding_size, self.class_start,
                              seed=seed, kernels=kernels, disk_dir=disk_dir)
        self.step = 0            # forward_backward calls so far: keys the sampler's random stream
        self._index = None       # local rows sampled in the last step (None: all rows)
        self._prepared = None    # (global labels, index, target_col, pull future, local labels) from prepare()
        self._bank_jobs = BankQueue(threaded=pipeline)
        self.timings = defaultdict(float)   # seconds per phase, accumulated (benchmarks and logs read it)
        self._head = KERNELS[kernels](self.ctx, scale=scale, margin=CombinedMargin(*margins, easy_margin=easy_margin),
                                      interclass_filter=interclass_filter, momentum=momentum,
                                      weight_decay=weight_decay, bank=self.bank, bank_jobs=self._bank_jobs,
                                      bank_location=bank_location, timings=self.timings)
        self._label_rule = "outside [0, %d) (%d marks an ignored row)" % (self.num_classes, IGNORE_LABEL)

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
        local = LocalInput("batch", None, local_labels, (IGNORE_LABEL, self.num_classes), self._label_rule)
        ranks = exchange([local], [], (local.y, None), self.embedding_size, name="pfc.labels")
        problems = [p for r, got in enumerate(ranks) for p in input_problems(r, got.inputs[0], 0, local)]
        raise_problems(problems, "PartialFC: bad input at step %d" % self.step)
        y = np.concatenate([got.labels for got in ranks])
        index, target_col = self.sampler.sample(y, self.step)
        pull = self._bank_jobs.submit("pull step %d" % self.step, self._head.pull, index)
        self._prepared = (y, index, target_col, pull, local.y)

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
        x_local, x, y = self._gather_inputs(local_embeddings, local_labels, prepared, flags, bank_error)
        xn, x_inv = l2_normalize_rows(x)
        clock.tick("gather")
        if prepared is None:
            index, target_col = self.sampler.sample(y, self.step)
            clock.tick("sample")
            pulled = self._bank_jobs.wait(self._bank_jobs.submit("pull step %d" % self.step, self._head.pull, index))
            clock.tick("bank_pull")
        else:
            index, target_col = prepared[1], prepared[2]
        self._index = index
        rows, inv_norm = pulled
        loss, grad_xn = self._head.forward_backward(xn, rows, inv_norm, index, target_col, y != IGNORE_LABEL, clock)
        b = x_local.shape[0]
        own = slice(self.rank * b, (self.rank + 1) * b)
        grad_xn_local = dist.reducescatter_sum(grad_xn, name="pfc.embedding_grad")
        grad_x = normalization_backward(xn[own], x_inv[own], grad_xn_local)
        self.step += 1
        clock.tick("gather")
        ctx = local_embeddings.context if isinstance(local_embeddings, mx.nd.NDArray) else self.ctx
        return loss, mx.nd.array(grad_x, ctx=ctx, dtype="float32")

    def update(self, lr):
        """SGD-momentum step (learning rate ``lr``) on the centres sampled in the last forward_backward.

        Pipelined, the bank's share (the SGD step and the write-back of each block of rows) is queued on the bank
        thread; this returns once the centre gradient's products are done."""
        if self._head.pending is None:
            raise RuntimeError("PartialFC.update() needs a forward_backward() first (and only one update per step)")
        self._head.update(float(lr), self.step - 1)

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
        """Finish the queued bank jobs and stop the bank thread; then release the bank (a disk bank's file)."""
        try:
            self._bank_jobs.drain()
        finally:
            self._bank_jobs.close()
            close_bank = getattr(self.bank, "close", None)
            if close_bank is not None:
                close_bank()

    def sampled_weight_grad(self):
        """d(loss)/d(W[sampled_index]) of the last step, (num_sample, D) NumPy (for tests and inspection)."""
        if self._head.pending is None:
            raise RuntimeError("no pending step: call forward_backward() first")
        return self._head.centre_grad()

    # ------------------------------------------------------------------------------------------ inputs
    def _gather_inputs(self, embeddings, labels, prepared, flags, bank_error):
        """Every rank's embeddings and labels with ONE allgather (``common.collective_input``), checked the same
        way on every rank, plus this method's own checks: equal batch sizes, the labels ``prepare`` was given, a
        failed bank. Returns (x_local, x_global, y_global)."""
        local = LocalInput("batch", embeddings, labels, (IGNORE_LABEL, self.num_classes), self._label_rule)
        if prepared is not None and not np.array_equal(local.y, prepared[4]):
            flags |= _LABELS_CHANGED
        payload = (local.y, local.x) if local.well_formed(self.embedding_size) else None
        ranks = exchange([local], [flags], payload, self.embedding_size, name="pfc.inputs")
        failures, problems = [], []
        batch = ranks[0].inputs[0]["rows"]
        for r, got in enumerate(ranks):
            fields, (rank_flags,) = got.inputs[0], got.extras
            if rank_flags & _BANK_FAILED:
                failures.append("rank %d's memory bank failed (%s)" % (
                    r, "%s: %s" % (type(bank_error).__name__, bank_error) if r == self.rank else "see its output"))
            if rank_flags & _LABELS_CHANGED:
                problems.append("rank %d passed labels that differ from the ones it gave prepare()" % r)
            if fields["rows"] != batch:
                problems.append("rank %d has batch size %d but rank 0 has %d" % (r, fields["rows"], batch))
            problems += input_problems(r, fields, self.embedding_size, local)
        if failures:
            raise RuntimeError("PartialFC: step %d cannot run: %s" % (self.step, "; ".join(failures)))
        raise_problems(problems, "PartialFC: bad input at step %d" % self.step)
        return local.x, np.concatenate([got.rows for got in ranks]), np.concatenate([got.labels for got in ranks])
