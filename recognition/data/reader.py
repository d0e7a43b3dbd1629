"""What a training-data reader provides (the training methods iterate over one), and its batch."""
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import mxnet as mx


class Batch(NamedTuple):
    data: mx.nd.NDArray      # (B, 3, H, W) float32 RGB 0-255, on the CPU
    label: np.ndarray        # (B,) int64 class ids
    pad: int                 # the last ``pad`` rows are padding, not images of this epoch


class BatchReader(ABC):
    """A rank's batches of an epoch. Implementations set ``steps_per_epoch`` (the same on every rank) and
    ``batch_size``; batches are a pure function of (seed, epoch, rank, step), so a run resumes exactly."""

    steps_per_epoch = 0
    batch_size = 0

    @abstractmethod
    def epoch(self, epoch, start_step=0):
        """An iterator over the Batches of steps ``start_step`` .. ``steps_per_epoch - 1`` of ``epoch``; reads
        nothing of the steps before ``start_step``."""

    @abstractmethod
    def close(self):
        """Stop the reader's threads and close its files (it may be closed without having been used)."""
