"""PPRN sampling (Positive Plus Randomly Negative) of one rank's class centres, vectorised.

Every step a rank keeps each centre of its shard whose class occurs in the global batch (positives) and fills
up to ``num_sample`` rows with distinct negatives drawn uniformly from the rest of its shard. Positives are never
dropped: when they outnumber ``num_sample`` the sample is just the positives. The random stream of step t is a
pure function of (seed, class_start, t), so a resumed run draws exactly what the uninterrupted one drew.
"""
import numpy as np


def num_sample_for(num_local, sample_ratio):
    """How many centres a shard of ``num_local`` rows contributes per step (at least one)."""
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError("sample_ratio must be in (0, 1], got %r" % (sample_ratio,))
    if sample_ratio >= 1.0:
        return int(num_local)
    return max(1, min(int(num_local), int(sample_ratio * num_local)))


def uniform_negatives(rng, num_local, positives, count):
    """``count`` distinct ids drawn uniformly from range(num_local) minus the sorted ``positives``.

    Draws ranks among the non-positive slots, then maps rank r to its id: the r-th non-positive id is
    r + #{positives p_j with p_j - j <= r}, because p_j - j counts the non-positives below p_j.
    """
    free = num_local - positives.size
    if count > free:
        raise ValueError("cannot draw %d negatives from %d free rows" % (count, free))
    if count <= 0:
        return np.empty(0, np.int64)
    slots = rng.choice(free, size=count, replace=False, shuffle=False).astype(np.int64)
    shift = positives - np.arange(positives.size, dtype=np.int64)
    return slots + np.searchsorted(shift, slots, side="right")


class PPRNSampler:
    """Chooses the sampled rows of one shard [class_start, class_start + num_local) for each step."""

    def __init__(self, num_local, class_start, sample_ratio=1.0, seed=0):
        self.num_local = int(num_local)
        self.class_start = int(class_start)
        self.sample_ratio = float(sample_ratio)
        self.num_sample = num_sample_for(self.num_local, self.sample_ratio)
        self.seed = int(seed)

    @property
    def samples_everything(self):
        return self.num_sample >= self.num_local

    def rng_for_step(self, step):
        return np.random.default_rng([self.seed, self.class_start, int(step)])

    def sample(self, global_labels, step):
        """Return ``(index, target_col)`` for the labels of the whole global batch.

        ``index``: sorted int64 local row ids of the sampled centres (None when every row is used, which
        avoids any gather). ``target_col``: for each global row, the column of its class in the sampled
        block, or -1 when its class lives on another rank.
        """
        labels = np.asarray(global_labels, dtype=np.int64)
        local = labels - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        target_col = np.full(labels.shape, -1, dtype=np.int64)
        if self.samples_everything:
            target_col[in_shard] = local[in_shard]
            return None, target_col
        positives = np.unique(local[in_shard])
        negatives = uniform_negatives(self.rng_for_step(step), self.num_local, positives,
                                      self.num_sample - positives.size)
        chosen = np.zeros(self.num_local, dtype=np.bool_)     # a pass over a byte mask sorts faster than sort()
        chosen[positives] = True
        chosen[negatives] = True
        index = np.flatnonzero(chosen)
        target_col[in_shard] = np.searchsorted(index, local[in_shard])
        return index, target_col
