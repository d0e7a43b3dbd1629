"""FFC's dynamic class queue (DCQ): Q slots of gallery features that stand in for the classifier.

State, identical on every rank: two banks of unit rows (2, Q, D) float32, the identity -> slot map with LRU
eviction (``slot_map.LRUSlotMap``) and a next-row bit per slot. One ``forward_backward`` (one side of an FFC
step, ``docs/ffc.md``):

1. gallery rows and labels of every rank are gathered with ONE allgather (each rank normalises its own rows
   first, so every rank receives the same bytes), together with each rank's shapes, label checks and
   finiteness for both inputs: bad input raises the same error on every rank, before any other collective;
2. the inserts, in rank order, are planned without changing anything (``LRUSlotMap.plan``), then resolved in a
   vectorised pass (``resolve_writes``): the touched slots S, their new rows in both banks, their next-row
   bits and the "existing" mark (a slot written by a label that already had it) - O(rows touched);
3. this rank's probe rows (normalised) are scored against bank 0 as it stands, with one large oneDNN
   ``FullyConnected``; the columns S are then replaced by the products with their new rows, which gives the
   first logit set, and the second set (bank 1 on the existing slots) differs from it only on those columns,
   so both sets cost one large product and its backward instead of two;
4. each set's loss (``queue_loss.QueueLoss``), their sum for this rank, its gradient back through the products
   (autograd of the recorded ``FullyConnected`` calls) and through the normalisation;
5. the side's loss is the mean over ranks (one more allgather; every rank sums in rank order, so the float is
   the same everywhere) and the gradient returned is that mean's: 1/world of this rank's own. The trainer sums
   backbone gradients over ranks (its convention for Partial FC too), which so averages the ranks' gradients as
   FFC asks (docs/ffc.md);
6. ``keep=True`` writes the rows, bits and map changes planned in step 2; ``keep=False`` (side A) writes
   nothing, so the state afterwards is bit-identical to before and "undoing" costs nothing.
"""
from collections import defaultdict

import numpy as np
import mxnet as mx

from recognition import dist
from recognition.common.collective_input import LocalInput, exchange, input_problems, raise_problems
from recognition.common.rows import Workspace, l2_normalize_rows, normalization_backward
from recognition.ffc.queue_loss import LOSS_TYPES, QueueLoss, hard_negative_count
from recognition.ffc.slot_map import LRUSlotMap
from recognition.progress import PhaseClock

_STATE_KEYS = ("banks", "slots", "next_row")
_LABEL_RULE = "(labels must be >= 0)"
_ANY_ID = (0, np.iinfo(np.int64).max)


def resolve_writes(slots, fresh, next_row):
    """Vectorised effect of one batch of inserts, given each insert's slot and whether it took a new slot.

    Returns (touched slots S sorted, for each of S the inserts writing bank 0 last and bank 1 last (-1: none),
    next-row bits of S afterwards, existing mark of S). An insert writes row next_row[s] of an old slot, row 0
    of a new one, and the row flips every insert; "existing": some insert of s kept a slot it had.
    """
    m = slots.size
    if m == 0:
        return np.zeros(0, np.int64), np.zeros((2, 0), np.int64), np.zeros(0, np.uint8), np.zeros(0, bool)
    order = np.argsort(slots, kind="stable")            # inserts grouped by slot, in insert order
    s_sorted, fresh_sorted = slots[order], fresh[order]
    slot_start = np.ones(m, bool)
    slot_start[1:] = s_sorted[1:] != s_sorted[:-1]
    tenure_start = slot_start | fresh_sorted           # a new slot restarts the row sequence at 0
    tenure = np.cumsum(tenure_start) - 1
    tenure_first = np.flatnonzero(tenure_start)
    first_bit = np.where(fresh_sorted[tenure_first], 0, next_row[s_sorted[tenure_first]].astype(np.int64))
    bit = (first_bit[tenure] + np.arange(m) - tenure_first[tenure]) & 1
    group_first = np.flatnonzero(slot_start)
    group_last = np.append(group_first[1:], m) - 1
    touched = s_sorted[group_first]
    group = np.cumsum(slot_start) - 1
    last_writer = np.full((2, touched.size), -1, np.int64)
    for b in (0, 1):
        rows = np.flatnonzero(bit == b)[::-1]          # reversed, so np.unique's first hit is the last insert
        groups, first = np.unique(group[rows], return_index=True)
        last_writer[b, groups] = order[rows[first]]
    next_bits = ((bit[group_last] + 1) & 1).astype(np.uint8)
    existing = np.logical_or.reduceat(~fresh_sorted, group_first)
    return touched, last_writer, next_bits, existing


class DynamicClassQueue:
    """FFC's dynamic class queue as a loss operator over Horovod ranks. See the module docstring.

    ``forward_backward(probe, probe_labels, gallery, gallery_labels, keep=True) -> (loss, d loss / d probe)``;
    ``state_dict()`` / ``load_state_dict(state)``. Horovod must be initialised by the caller (``hvd.init()``).
    """

    def __init__(self, queue_size, embedding_size, loss="arcface", margin=0.5, scale=32.0, sv_t=1.2, seed=0):
        if int(queue_size) < 1 or int(embedding_size) < 1:
            raise ValueError("queue_size and embedding_size must be >= 1, got %r and %r"
                             % (queue_size, embedding_size))
        if loss not in LOSS_TYPES:
            raise ValueError("loss must be one of %s, got %r" % (LOSS_TYPES, loss))
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(margin) and margin >= 0 and np.isfinite(sv_t)):
            raise ValueError("need scale > 0, margin >= 0 and a finite sv_t, got scale=%r margin=%r sv_t=%r"
                             % (scale, margin, sv_t))
        self.queue_size, self.embedding_size = int(queue_size), int(embedding_size)
        self.rank, self.world_size = dist.rank(), dist.size()
        self.hard_negatives = hard_negative_count(self.queue_size)
        self.loss_fn = QueueLoss(loss, margin, scale, sv_t, self.hard_negatives)
        # uniform [0, 1) rows, normalised, as the reference initialises its queue; the seed makes ranks agree
        rng = np.random.default_rng(seed)
        banks = rng.random((2, self.queue_size, self.embedding_size), dtype=np.float32)
        self._banks = l2_normalize_rows(banks.reshape(-1, self.embedding_size))[0].reshape(banks.shape)
        self._next_row = np.zeros(self.queue_size, np.uint8)
        self._slots = LRUSlotMap(self.queue_size)
        self.calls = 0                       # forward_backward calls so far (for error messages)
        self.last_stats = {}                 # counts of the last call (rows with a target, fresh rows, inserts ...)
        self.timings = defaultdict(float)    # seconds per phase, accumulated (benchmarks and logs read it)
        self._workspace = Workspace()        # the (n, Q) scratch arrays, reused from call to call

    # ----------------------------------------------------------------------------------------- public API
    @property
    def num_identities(self):
        """Identities holding a slot."""
        return len(self._slots)

    def forward_backward(self, probe, probe_labels, gallery, gallery_labels, keep=True):
        """The side's loss (mean over ranks, the same float on every rank) and its gradient w.r.t. this rank's raw
        ``probe`` rows (the kind of ``probe``: an NDArray on its context, or a NumPy array)."""
        clock = PhaseClock(self.timings)
        p, p_labels, g_unit, g_labels = self._gather_inputs(probe, probe_labels, gallery, gallery_labels, keep)
        clock.tick("gather")
        plan = self._slots.plan(g_labels.tolist())
        target = self._slots.lookup(p_labels.tolist(), plan)
        clock.tick("lru")
        touched, last_writer, next_bits, existing = resolve_writes(plan.slots, plan.fresh, self._next_row)
        new_rows = self._banks[:, touched]                   # (2, |S|, D) copy: the touched slots after the inserts
        for b in (0, 1):
            w = last_writer[b] >= 0
            new_rows[b, w] = g_unit[last_writer[b, w]]
        clock.tick("inserts")
        loss_local, grad_probe = self._score(p, target, touched, new_rows, existing, clock)
        every = dist.allgather(np.array([loss_local], np.float64), name="ffc.loss")
        loss = float(np.sum(every) / self.world_size)
        clock.tick("loss_sync")
        if keep:
            self._banks[:, touched] = new_rows
            self._next_row[touched] = next_bits
            self._slots.commit(plan)
        self.calls += 1
        self.last_stats = {"probe_rows": int(target.size), "probe_targets": int(np.count_nonzero(target >= 0)),
                           "inserts": int(plan.slots.size), "new_slots": int(np.count_nonzero(plan.fresh)),
                           "evicted": len(plan.evicted), "existing": int(np.count_nonzero(existing))}
        clock.tick("commit")
        if isinstance(probe, mx.nd.NDArray):
            return loss, mx.nd.array(grad_probe, ctx=probe.context, dtype="float32")
        return loss, grad_probe

    def state_dict(self):
        """Copies of the queue state: banks float32 (2, Q, D), slots int64 (n, 2) [label, slot] least recently
        used first, next_row uint8 (Q,)."""
        return {"banks": self._banks.copy(), "slots": self._slots.state(), "next_row": self._next_row.copy()}

    def load_state_dict(self, state):
        """Replace the state by ``state`` (the ``state_dict`` format) after checking it; nothing changes on error."""
        problems = []
        keys = set(state) if hasattr(state, "keys") else set()
        if keys != set(_STATE_KEYS):
            raise ValueError("DynamicClassQueue state needs exactly the keys %s, got %s"
                             % (list(_STATE_KEYS), sorted(keys, key=str)))
        banks, slots, next_row = (np.asarray(state[k]) for k in _STATE_KEYS)
        shape = (2, self.queue_size, self.embedding_size)
        if banks.shape != shape or not np.issubdtype(banks.dtype, np.floating):
            problems.append("banks must be float %s, got %s %s" % (shape, banks.dtype, banks.shape))
        elif not np.all(np.isfinite(banks)):
            problems.append("banks hold %d non-finite values" % (banks.size - np.count_nonzero(np.isfinite(banks))))
        if not np.issubdtype(slots.dtype, np.integer):
            problems.append("slots must be integers, got %s" % slots.dtype)
        else:
            problems += LRUSlotMap.check_state(slots, self.queue_size)
        if next_row.shape != (self.queue_size,) or not np.issubdtype(next_row.dtype, np.integer):
            problems.append("next_row must be integer (%d,), got %s %s" % (self.queue_size, next_row.dtype,
                                                                           next_row.shape))
        elif np.any((next_row != 0) & (next_row != 1)):
            bad = int(np.flatnonzero((next_row != 0) & (next_row != 1))[0])
            problems.append("next_row[%d] is %d, not 0 or 1" % (bad, next_row[bad]))
        if problems:
            raise ValueError("DynamicClassQueue: bad state: " + "; ".join(problems))
        self._slots.load(slots.astype(np.int64))
        self._banks = np.array(banks, dtype=np.float32)
        self._next_row = next_row.astype(np.uint8)

    # ------------------------------------------------------------------------------------------ checks
    def _gather_inputs(self, probe, probe_labels, gallery, gallery_labels, keep):
        """Gather every rank's gallery (normalised by its owner) and labels with ONE allgather, with each rank's
        description of both inputs, its ``keep`` and its number of identities (``common.collective_input``), and
        check them identically on every rank (ranks that disagree on ``keep`` or hold different queues would
        drift apart silently). Returns this rank's probe (float32), probe labels (int64), and the global gallery
        unit rows and labels in rank order."""
        local = [LocalInput("probe", probe, probe_labels, _ANY_ID, _LABEL_RULE),
                 LocalInput("gallery", gallery, gallery_labels, _ANY_ID, _LABEL_RULE)]
        g = local[1]
        payload = (g.y, l2_normalize_rows(g.x)[0]) if g.well_formed(self.embedding_size) else None
        ranks = exchange(local, [int(bool(keep)), len(self._slots)], payload, self.embedding_size,
                         name="ffc.inputs")
        problems = []
        keep_0, identities_0 = ranks[0].extras
        for r, got in enumerate(ranks):
            for fields, mine in zip(got.inputs, local):
                problems += input_problems(r, fields, self.embedding_size, mine)
            rank_keep, identities = got.extras
            if rank_keep != keep_0:
                problems.append("rank %d passed keep=%s but rank 0 keep=%s" % (r, bool(rank_keep), bool(keep_0)))
            if identities != identities_0:
                problems.append("rank %d's queue holds %d identities but rank 0's %d (the ranks' queues differ: "
                                "load the same state on every rank)" % (r, identities, identities_0))
        raise_problems(problems, "DynamicClassQueue: bad input at call %d" % self.calls)
        return (local[0].x, local[0].y, np.concatenate([got.rows for got in ranks]),
                np.concatenate([got.labels for got in ranks]))

    # ------------------------------------------------------------------------------------------ scoring
    def _score(self, p, target, touched, new_rows, existing, clock):
        """This rank's loss (sum of both logit sets) and its gradient w.r.t. the raw probe rows (already / world)."""
        n, q = p.shape[0], self.queue_size
        # rows with a target first, so each loss term works on a contiguous block
        order = np.argsort(target < 0, kind="stable")
        num_target = int(np.count_nonzero(target >= 0))
        unit, inv_norm = l2_normalize_rows(p[order])
        grad_probe = np.zeros_like(unit)
        if n == 0:
            return 0.0, grad_probe
        bank0 = mx.nd.from_numpy(self._banks[0].view(), zero_copy=True)
        unit_nd = mx.nd.array(unit)
        unit_nd.attach_grad()
        new0 = mx.nd.array(new_rows[0])
        new1 = mx.nd.array(new_rows[1][existing])
        with mx.autograd.record():
            products = [mx.nd.FullyConnected(unit_nd, w, no_bias=True, num_hidden=w.shape[0])
                        for w in (bank0, new0, new1) if w.shape[0]]
        cos1 = self._workspace.get("cos1", (n, q))
        products[0].copyto(mx.nd.from_numpy(cos1.view(), zero_copy=True)).wait_to_read()
        small = [c.asnumpy() for c in products[1:]]
        clock.tick("logits_gemm")
        cos2 = self._workspace.get("cos2", (n, q))
        ex = touched[existing]
        if touched.size:
            cos1[:, touched] = small[0]
        cos2[:] = cos1
        if ex.size:
            cos2[:, ex] = small[1]
        grad1, grad2 = self._workspace.get("grad1", (n, q)), self._workspace.get("grad2", (n, q))
        target_sorted = target[order][:num_target]
        loss = self.loss_fn(cos1, target_sorted, grad1) + self.loss_fn(cos2, target_sorted, grad2)
        clock.tick("loss")
        heads = []
        if touched.size:
            # the new rows of bank 0 serve set 1 on S and set 2 on S minus the existing slots; bank 1 set 2 there
            g_new0 = grad1[:, touched] + grad2[:, touched] * ~existing
            heads = [mx.nd.array(g_new0), mx.nd.array(grad2[:, ex])][:len(small)]
        grad1 += grad2
        grad1[:, touched] = 0.0                      # those columns went through the new rows above
        mx.autograd.backward(products, [mx.nd.from_numpy(grad1.view(), zero_copy=True)] + heads)
        grad_sorted = unit_nd.grad.asnumpy()
        clock.tick("backward_gemm")
        grad_sorted *= np.float32(1.0 / self.world_size)
        grad_probe[order] = normalization_backward(unit, inv_norm, grad_sorted)
        return loss, grad_probe
