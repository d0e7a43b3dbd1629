"""The queue's identity -> slot map: capacity Q, least-recently-used eviction, exact insert order.

Inserting a batch of labels happens in two stages so that FFC's side A (whose changes must all be undone) never
touches the map: ``plan(labels)`` works out, read-only, which slot every label gets and what the map would look
like afterwards; ``commit(plan)`` applies it in O(labels) (side B). Between the two, ``lookup(labels, plan)``
sees the map as the plan leaves it.

The sequential semantics, for each label in order: a label with a slot keeps it and becomes the most recently
used; a label without one takes the lowest never-used slot, or else the least recently used label's slot (that
label leaves the map), and becomes the most recently used. Within a batch this matters: a label can lose its
slot to an earlier label of the same batch and then need a new one, and with more distinct labels than Q a label
inserted earlier in the batch is evicted again. The order is an ``OrderedDict`` (least recently used first):
every step is O(1) in C; the per-label loop is inherent to the sequential semantics (its cost: the ``lru``
phase of the FFC head benchmark, docs/benchmarks.md).
"""
from collections import OrderedDict

import numpy as np


class InsertPlan:
    """What ``LRUSlotMap.plan`` worked out for one batch of labels.

    ``slots[i]``: the slot label i writes to; ``fresh[i]``: label i had no slot just before it (a new slot,
    written from row 0). The rest is the plan's view of the map (used by ``lookup`` and ``commit``).
    """

    def __init__(self, slots, fresh, recent, evicted, free_taken):
        self.slots, self.fresh = slots, fresh
        self.recent = recent          # OrderedDict label -> slot of the labels this batch touched, LRU first
        self.evicted = evicted        # labels of the map before the batch that lost their slot
        self.free_taken = free_taken  # never-used slots the batch took


class LRUSlotMap:
    """Identity label -> queue slot with least-recently-used eviction. See the module docstring."""

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self._order = OrderedDict()                     # label -> slot, least recently used first
        self._free = np.arange(self.capacity, dtype=np.int64)   # never-used slots, in the order they are taken
        self._free_pos = 0

    def __len__(self):
        return len(self._order)

    def plan(self, labels):
        """Slots for inserting ``labels`` (ints, in order) without changing the map; see ``InsertPlan``."""
        order, recent, evicted = self._order, OrderedDict(), set()
        victims = iter(order.items())       # untouched labels of the map are evicted in this order
        free_pos = self._free_pos
        slots = np.empty(len(labels), np.int64)
        fresh = np.zeros(len(labels), bool)
        for i, label in enumerate(labels):
            slot = recent.get(label)
            if slot is not None:
                recent.move_to_end(label)
            elif label in order and label not in evicted:
                slot = recent[label] = order[label]
            else:
                fresh[i] = True
                if free_pos < self._free.size:
                    slot = int(self._free[free_pos])
                    free_pos += 1
                else:
                    slot = self._evict(victims, recent, evicted)
                recent[label] = slot
            slots[i] = slot
        return InsertPlan(slots, fresh, recent, evicted, free_pos - self._free_pos)

    @staticmethod
    def _evict(victims, recent, evicted):
        """Free the least recently used slot: the oldest label the batch has not touched, else (the batch has
        touched every label of the map) the oldest label the batch touched."""
        for label, slot in victims:
            if label not in recent and label not in evicted:
                evicted.add(label)
                return slot
        label, slot = recent.popitem(last=False)
        evicted.add(label)      # a no-op for a label that was not in the map before the batch
        return slot

    def commit(self, plan):
        """Apply a plan made on the current map (the map must not have changed since ``plan``)."""
        order = self._order
        for label in plan.evicted:
            order.pop(label, None)
        for label, slot in plan.recent.items():
            order[label] = slot
            order.move_to_end(label)
        self._free_pos += plan.free_taken

    def lookup(self, labels, plan=None):
        """Slot of each label (-1: none), as the map stands after ``plan`` (now, without one); no recency
        change."""
        order = self._order
        if plan is None:
            return np.array([order.get(label, -1) for label in labels], dtype=np.int64)
        recent, evicted = plan.recent, plan.evicted
        return np.array([recent.get(label, -1 if label in evicted else order.get(label, -1)) for label in labels],
                        dtype=np.int64)

    def state(self):
        """int64 (n, 2) rows of [label, slot], least recently used first."""
        pairs = np.empty((len(self._order), 2), np.int64)
        if self._order:
            pairs[:, 0] = np.fromiter(self._order.keys(), np.int64, len(self._order))
            pairs[:, 1] = np.fromiter(self._order.values(), np.int64, len(self._order))
        return pairs

    @staticmethod
    def check_state(pairs, capacity):
        """The reasons an (n, 2) [label, slot] array is not a valid state for ``capacity`` slots (empty: valid)."""
        problems = []
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            return ["slots must have shape (n, 2) rows of [label, slot], got %s" % (pairs.shape,)]
        if pairs.shape[0] > capacity:
            problems.append("slots has %d rows but the queue has %d slots" % (pairs.shape[0], capacity))
        labels, slots = pairs[:, 0], pairs[:, 1]
        for name, values in (("label", labels), ("slot", slots)):
            uniq, counts = np.unique(values, return_counts=True)
            if np.any(counts > 1):
                dup = int(uniq[counts > 1][0])
                problems.append("duplicate %s %d (rows %s)" % (name, dup, np.flatnonzero(values == dup).tolist()))
        bad = np.flatnonzero((slots < 0) | (slots >= capacity))
        if bad.size:
            problems.append("slot %d (row %d) outside [0, %d)" % (slots[bad[0]], bad[0], capacity))
        bad = np.flatnonzero(labels < 0)
        if bad.size:
            problems.append("label %d (row %d) is negative" % (labels[bad[0]], bad[0]))
        return problems

    def load(self, pairs):
        """Replace the map by a validated (n, 2) int64 [label, slot] array, least recently used first; the slots
        not in it count as never used and are taken lowest first."""
        pairs = np.asarray(pairs, dtype=np.int64)
        problems = self.check_state(pairs, self.capacity)
        if problems:
            raise ValueError("LRUSlotMap: bad state: " + "; ".join(problems))
        self._order = OrderedDict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
        self._free = np.setdiff1d(np.arange(self.capacity, dtype=np.int64), pairs[:, 1])
        self._free_pos = 0
