"""SyntheticReader: uniform, deterministic labels over up to 10^8 classes; random pixels."""
import numpy as np

from recognition.data import synthetic_reader


def test_synthetic_reader_labels_uniform_and_deterministic():
    reader = synthetic_reader.SyntheticReader(64, 100_000_000, steps_per_epoch=6, rank=1, num_ranks=2, seed=9)
    batches = list(reader.epoch(3))
    assert len(batches) == 6 and reader.num_images == 6 * 64 * 2
    labels = np.concatenate([b.label for b in batches])
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 100_000_000
    assert len(np.unique(labels)) == len(labels)                       # not all 0, spread over 10^8 classes
    assert labels.max() > 50_000_000 > labels.min()
    x = batches[0].data.asnumpy()
    assert x.shape == (64, 3, 112, 112) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 255
    assert x.std() > 50                                               # random pixels
    again = list(synthetic_reader.SyntheticReader(64, 100_000_000, steps_per_epoch=6, rank=1, num_ranks=2,
                                              seed=9).epoch(3, start_step=4))
    assert np.array_equal(again[0].label, batches[4].label)
    assert np.array_equal(again[1].data.asnumpy(), batches[5].data.asnumpy())
    other_rank = next(synthetic_reader.SyntheticReader(64, 100_000_000, rank=0, num_ranks=2, seed=9).epoch(3))
    assert not np.array_equal(other_rank.label, batches[0].label)
    # uniform over a small range: every class about equally often
    small = np.concatenate([b.label for b in synthetic_reader.SyntheticReader(500, 10, steps_per_epoch=20).epoch(0)])
    counts = np.bincount(small, minlength=10)
    assert counts.min() > 850 and counts.max() < 1150                  # 1000 expected, sd ~30
