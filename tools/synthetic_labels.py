"""The labels and pairs of a synthetic data set (``tools/make_synthetic.py``), as pure functions of their
arguments: how many images each training identity gets, which identities are split over two labels and which
images carry a wrong one (``labels.npz`` records the result), and the holdout set's verification pairs.
"""
from typing import NamedTuple

import numpy as np

_PAIRS, _SPLIT, _RELABEL = 2, 4, 5      # seed streams (make_synthetic.py: 0, 1, 3; make_synthetic_ijb: 10+)


def image_counts(identities, images, long_tail=0.0, min_images=1):
    """Images of each training identity (int64 (identities,)): ``images`` each, or with ``long_tail`` a > 0 the
    power law max(min_images, round(images * (k + 1) ** -a)) over the identity number k."""
    if not long_tail:
        return np.full(identities, images, np.int64)
    counts = np.rint(images * np.arange(1, identities + 1, dtype=np.float64) ** -float(long_tail))
    return np.maximum(counts, min_images).astype(np.int64)


class LabelPlan(NamedTuple):
    """The truth of a training set, one entry per record in record order (sorted by label, then identity, view)."""
    identity: np.ndarray        # int64: the drawn identity
    view: np.ndarray            # int64: its view number
    label: np.ndarray           # int64: the label written
    noisy: np.ndarray           # bool: the label is another identity's (label noise)
    second_label: np.ndarray    # int64 (identities,): the second label of a conflicted identity, -1 for none
    num_labels: int


def label_plan(counts, seed, conflicts=0.0, label_noise=0.0):
    """The labels of a training set with ``counts`` images per identity (see the module docstring): conflicted
    identities (stream _SPLIT) and noisy images (stream _RELABEL) are seeded draws, so the plan is a pure
    function of the arguments. Raises ValueError when the fractions cannot be met."""
    counts = np.asarray(counts, np.int64)
    n = len(counts)
    identity = np.repeat(np.arange(n, dtype=np.int64), counts)
    view = np.arange(len(identity), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    label = identity.copy()
    eligible = np.flatnonzero(counts >= 2)
    split = int(round(conflicts * n))
    if split > len(eligible):
        raise ValueError("--conflicts %g asks for %d identities split over two labels, but only %d have >= 2 images"
                         % (conflicts, split, len(eligible)))
    second = np.full(n, -1, np.int64)
    chosen = np.sort(np.random.default_rng([seed, _SPLIT]).choice(eligible, split, replace=False))
    second[chosen] = n + np.arange(split)
    moved = (second[identity] >= 0) & (view >= counts[identity] - counts[identity] // 2)
    label[moved] = second[identity[moved]]
    num_labels = n + split
    # every label keeps its first image (so no label is emptied by the noise)
    first_of_label = np.zeros(len(label), bool)
    first_of_label[np.unique(label, return_index=True)[1]] = True
    candidates = np.flatnonzero(~first_of_label)
    noisy_count = int(round(label_noise * len(label)))
    if noisy_count and (noisy_count > len(candidates) or num_labels < 3):
        raise ValueError("--label-noise %g asks for %d relabelled images, but only %d can move (each label keeps an "
                         "image; at least 2 identities)" % (label_noise, noisy_count, len(candidates)))
    rng = np.random.default_rng([seed, _RELABEL])
    noisy = np.zeros(len(label), bool)
    for i in np.sort(rng.choice(candidates, noisy_count, replace=False)):
        own = sorted(v for v in (identity[i], second[identity[i]]) if v >= 0)
        new = int(rng.integers(num_labels - len(own)))
        for taken in own:               # skip the identity's own labels
            new += new >= taken
        label[i], noisy[i] = new, True
    order = np.lexsort((view, identity, label))
    return LabelPlan(identity[order], view[order], label[order], noisy[order], second, num_labels)


def make_pairs(num_identities, images_per_identity, num_pairs, seed):
    """[(identity a, view a, identity b, view b, same)] with num_pairs / 2 same-identity pairs (two different
    views) and as many pairs of two different identities, in a seeded random order."""
    if num_pairs % 2 or num_pairs < 2:
        raise ValueError("--pairs must be a positive even number, got %d" % num_pairs)
    if num_identities < 2 or images_per_identity < 2:
        raise ValueError("holdout pairs need >= 2 identities (--holdout) with >= 2 images each (--holdout-images), "
                         "got %d x %d" % (num_identities, images_per_identity))
    rng = np.random.default_rng([seed, _PAIRS])
    pairs = []
    for _ in range(num_pairs // 2):
        a = int(rng.integers(num_identities))
        va, vb = (int(v) for v in rng.choice(images_per_identity, 2, replace=False))
        pairs.append((a, va, a, vb, True))
        a, b = (int(v) for v in rng.choice(num_identities, 2, replace=False))
        pairs.append((a, int(rng.integers(images_per_identity)), b, int(rng.integers(images_per_identity)), False))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]
