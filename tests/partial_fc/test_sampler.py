"""PPRN sampling: positives always kept, distinct uniform negatives, exact counts, reproducible."""
import numpy as np
import pytest

from recognition.partial_fc.sampler import PPRNSampler, num_sample_for, uniform_negatives


def test_num_sample_rounds_down_and_checks_the_ratio():
    assert num_sample_for(1000, 0.1) == 100
    assert num_sample_for(1001, 0.1) == 100
    assert num_sample_for(5, 0.01) == 1
    assert num_sample_for(7, 1.0) == 7
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="sample_ratio"):
            num_sample_for(10, bad)


def test_positives_present_no_duplicates_exact_count():
    sampler = PPRNSampler(num_local=500, class_start=1000, sample_ratio=0.1, seed=3)
    rng = np.random.default_rng(0)
    for step in range(20):
        labels = rng.integers(0, 3000, size=64)   # most labels belong to other ranks
        index, target_col = sampler.sample(labels, step)
        assert index.dtype == np.int64
        assert index.size == 50
        assert np.all(np.diff(index) > 0)          # sorted and distinct
        assert index.min() >= 0 and index.max() < 500
        mine = (labels >= 1000) & (labels < 1500)
        assert set(labels[mine] - 1000) <= set(index.tolist())
        np.testing.assert_array_equal(index[target_col[mine]], labels[mine] - 1000)
        assert np.all(target_col[~mine] == -1)


def test_positives_exceeding_num_sample_are_all_kept():
    sampler = PPRNSampler(num_local=100, class_start=0, sample_ratio=0.05, seed=0)   # num_sample 5
    labels = np.arange(0, 100, 3)                                                     # 34 distinct positives
    index, target_col = sampler.sample(labels, step=0)
    np.testing.assert_array_equal(index, labels)
    np.testing.assert_array_equal(index[target_col], labels)


def test_ratio_one_uses_every_row_without_sampling():
    sampler = PPRNSampler(num_local=10, class_start=20, sample_ratio=1.0)
    index, target_col = sampler.sample(np.array([25, 3, 29, 20]), step=7)
    assert index is None
    np.testing.assert_array_equal(target_col, [5, -1, 9, 0])


def test_reproducible_under_a_seed_and_different_across_steps_and_seeds():
    labels = np.array([3, 17, 17, 42])
    a = PPRNSampler(1000, 0, 0.05, seed=11)
    b = PPRNSampler(1000, 0, 0.05, seed=11)
    c = PPRNSampler(1000, 0, 0.05, seed=12)
    np.testing.assert_array_equal(a.sample(labels, 5)[0], b.sample(labels, 5)[0])
    assert not np.array_equal(a.sample(labels, 5)[0], a.sample(labels, 6)[0])
    assert not np.array_equal(a.sample(labels, 5)[0], c.sample(labels, 5)[0])


def test_negatives_are_uniform_over_the_non_positive_rows():
    # chi-square goodness of fit over many draws: each of the 95 free rows is drawn with equal probability
    positives = np.array([0, 7, 8, 50, 99], dtype=np.int64)
    free = np.setdiff1d(np.arange(100), positives)
    counts = np.zeros(100)
    draws, per_draw = 4000, 10
    rng = np.random.default_rng(1)
    for _ in range(draws):
        neg = uniform_negatives(rng, 100, positives, per_draw)
        assert np.unique(neg).size == per_draw
        assert not np.isin(neg, positives).any()
        counts[neg] += 1
    observed = counts[free]
    expected = draws * per_draw / free.size
    chi2 = np.sum((observed - expected) ** 2 / expected)
    # 94 degrees of freedom: mean 94, sd ~13.7; 160 is beyond the 99.99th percentile
    assert chi2 < 160, chi2
    assert counts[positives].sum() == 0


def test_negative_mapping_is_exact_when_all_free_rows_are_drawn():
    positives = np.array([1, 2, 5], dtype=np.int64)
    neg = uniform_negatives(np.random.default_rng(0), 8, positives, 5)
    np.testing.assert_array_equal(np.sort(neg), [0, 3, 4, 6, 7])
    with pytest.raises(ValueError, match="cannot draw"):
        uniform_negatives(np.random.default_rng(0), 8, positives, 6)
