"""A plain NumPy / pure-Python reference of docs/ffc.md's queue and the loss of one side, for the tests.

Written from the specification alone, step by step, with nothing shared with ``recognition.ffc``: the LRU is a
Python list (least recently used first) and a dict, every insert and every probe row is handled in its own loop
iteration, the products are float64 matrix products, and gradients come from the chain rule written out here.
"""
import math

import numpy as np


def unit_rows(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


class ReferenceQueue:
    """The queue state of docs/ffc.md: banks (2, Q, D), the identity -> slot map in LRU order, next-row bits."""

    def __init__(self, banks, slots, next_row):
        self.banks = np.array(banks, np.float64)
        self.queue_size = self.banks.shape[1]
        self.lru = [int(label) for label, _ in slots]          # least recently used first
        self.slot_of = {int(label): int(slot) for label, slot in slots}
        self.next_row = [int(b) for b in next_row]
        self.evictions = 0

    def copy(self):
        twin = ReferenceQueue(self.banks, self.state()["slots"], self.next_row)
        twin.evictions = self.evictions
        return twin

    def insert(self, feature, label):
        """Insert one gallery feature (unit) with its label; True when the label already had a slot."""
        if label in self.slot_of:
            slot = self.slot_of[label]
            row = self.next_row[slot]
            self.banks[row, slot] = feature
            self.next_row[slot] = 1 - row
            self.lru.remove(label)
            self.lru.append(label)
            return slot, True
        taken = set(self.slot_of.values())
        never_used = [s for s in range(self.queue_size) if s not in taken]
        if never_used:
            slot = never_used[0]
        else:
            oldest = self.lru.pop(0)
            slot = self.slot_of.pop(oldest)
            self.evictions += 1
        self.slot_of[label] = slot
        self.lru.append(label)
        self.banks[0, slot] = feature
        self.next_row[slot] = 1
        return slot, False

    def state(self):
        return {"banks": self.banks.astype(np.float32),
                "slots": np.array([[label, self.slot_of[label]] for label in self.lru], np.int64).reshape(-1, 2),
                "next_row": np.array(self.next_row, np.uint8)}


def arcface_psi(c, m):
    """cos(theta + m), continued with slope 1 beyond theta = pi - m (the project's convention, so psi keeps
    decreasing as theta grows); returns (psi, dpsi/dc)."""
    theta = math.acos(max(-1.0, min(1.0, c)))
    if theta + m <= math.pi:
        return math.cos(theta + m), math.sin(theta + m) / math.sin(theta)
    return c - math.cos(math.pi - m) - 1.0, 1.0


def logit_set_loss(cos, targets, loss_type, m, s, t, k):
    """The loss of one logit set (cos: (n, Q) float64, targets: slot or None per row) and d loss / d cos."""
    n, q = cos.shape
    grad = np.zeros_like(cos)
    with_target = [i for i in range(n) if targets[i] is not None]
    fresh = [i for i in range(n) if targets[i] is None]
    ce = 0.0
    for i in with_target:
        tgt = targets[i]
        c_t = cos[i, tgt]
        logits = cos[i].copy()
        slope = np.ones(q)
        if loss_type == "arcface":
            psi, dpsi = arcface_psi(c_t, m)
        elif loss_type == "cosface":
            psi, dpsi = c_t - m, 1.0
        else:   # sv
            psi, dpsi = (c_t - m if c_t > m else c_t), 1.0
            for j in range(q):
                if j != tgt and cos[i, j] > c_t - m:
                    logits[j] = t * cos[i, j] + t - 1.0
                    slope[j] = t
        logits[tgt] = psi
        slope[tgt] = dpsi
        z = s * logits
        top = z.max()
        log_sum = top + math.log(np.sum(np.exp(z - top)))
        ce += (log_sum - z[tgt]) / len(with_target)
        prob = np.exp(z - log_sum)
        onehot = np.zeros(q)
        onehot[tgt] = 1.0
        grad[i] = s * (prob - onehot) * slope / len(with_target)
    hard = 0.0
    for i in fresh:
        largest = np.argsort(-cos[i], kind="stable")[:k]
        for j in largest:
            if cos[i, j] > 0:
                hard += cos[i, j] / (len(fresh) * k)
                grad[i, j] += 1.0 / (len(fresh) * k)
    return ce + hard, grad


def insert_gallery(queue, gallery, gallery_labels):
    """The queue after inserting every rank's gallery rows in rank order (a new object) and the slots marked
    existing (written by a label that already had a slot)."""
    after = queue.copy()
    existing = set()
    for feats, labels in zip(gallery, gallery_labels):
        for g, label in zip(unit_rows(feats), labels):
            slot, had_slot = after.insert(g, int(label))
            if had_slot:
                existing.add(slot)
    return after, existing


def rank_loss(after, existing, p, labels, loss_type, m, s=32.0, t=1.2):
    """One rank's loss (both logit sets) and its gradient w.r.t. its raw probe rows p, float64."""
    bank0 = after.banks[0]
    second = bank0.copy()
    for slot in existing:
        second[slot] = after.banks[1, slot]
    k = min(max(int(0.0002 * after.queue_size), 3), 10)
    p = np.asarray(p, np.float64)
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    unit = p / norm
    targets = [after.slot_of.get(int(label)) for label in labels]
    loss, grad_unit = 0.0, np.zeros_like(unit)
    for weights in (bank0, second):
        part, grad_cos = logit_set_loss(unit @ weights.T, targets, loss_type, m, s, t, k)
        loss += part
        grad_unit += grad_cos @ weights
    return loss, (grad_unit - unit * np.sum(unit * grad_unit, axis=1, keepdims=True)) / norm


def reference_side(queue, gallery, gallery_labels, probes, probe_labels, loss_type, m, s=32.0, t=1.2):
    """One side of docs/ffc.md on every rank at once.

    gallery / gallery_labels / probes / probe_labels: per-rank lists (raw features). Returns the queue after the
    inserts (a new object: the caller keeps or drops it), the loss averaged over ranks and each rank's
    d(averaged loss)/d(its raw probe rows), float64.
    """
    after, existing = insert_gallery(queue, gallery, gallery_labels)
    world = len(probes)
    results = [rank_loss(after, existing, p, labels, loss_type, m, s, t) for p, labels in zip(probes, probe_labels)]
    return after, sum(r[0] for r in results) / world, [r[1] / world for r in results]
