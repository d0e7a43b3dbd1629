"""Random images with random class ids: the reader of benchmarks and synthetic-preset runs (no files)."""
import numpy as np
import mxnet as mx

from recognition.data.reader import Batch, BatchReader
from recognition.data.record_reader import mix_seed

_POOL = 4      # stream tag of the image-pool generator


class SyntheticReader(BatchReader):
    """Random images with uniformly random class ids in [0, num_classes) (up to 10^8 and beyond), for benchmarks:
    the same interface as RecordReader. Rows are drawn from a fixed pool of random images; images and labels of
    (epoch, step) are a pure function of (seed, epoch, rank, step)."""

    def __init__(self, batch_size, num_classes, steps_per_epoch=1000, rank=0, num_ranks=1, seed=0,
                 image_size=(112, 112)):
        if batch_size < 1 or num_classes < 1 or steps_per_epoch < 1 or not 0 <= rank < num_ranks:
            raise ValueError("need batch_size, num_classes, steps_per_epoch >= 1 and 0 <= rank < num_ranks")
        self.batch_size, self.num_classes = int(batch_size), int(num_classes)
        self.steps_per_epoch = int(steps_per_epoch)
        self.rank, self.num_ranks, self.seed = int(rank), int(num_ranks), int(seed)
        self.num_images = self.steps_per_epoch * self.batch_size * self.num_ranks
        rng = np.random.default_rng(mix_seed(seed, rank, _POOL))
        pool_size = self.batch_size + 61      # rows are drawn with replacement: batches differ step to step
        self._pool = rng.integers(0, 256, (pool_size, 3) + tuple(image_size), dtype=np.uint8).astype(np.float32)

    def epoch(self, epoch, start_step=0):
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError("start_step %d outside [0, %d]" % (start_step, self.steps_per_epoch))
        for step in range(start_step, self.steps_per_epoch):
            rng = np.random.default_rng(mix_seed(self.seed, epoch, self.rank, step))
            rows = rng.integers(0, len(self._pool), self.batch_size)
            labels = rng.integers(0, self.num_classes, self.batch_size, dtype=np.int64)
            yield Batch(mx.nd.from_numpy(np.take(self._pool, rows, axis=0), zero_copy=True), labels, 0)

    def close(self):
        """Nothing to release: no threads, no files."""
