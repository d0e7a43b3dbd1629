"""The order in which ``mx.io.ImageRecordIter`` visits a part of an indexed RecordIO file, computed without reading it.

With ``path_imgidx`` and ``shuffle=True``, MXNet 1.9.1 hands the part to dmlc-core's indexed RecordIO splitter. The
splitter keeps a ``std::mt19937`` seeded with ``111 + seed`` and shuffles the positions 0 .. n-1 of the part (records
in offset order) with ``std::shuffle`` once when it is made and again on every rewind; ``round_batch`` rewinds it
to complete the last batch, so that batch ends with the first records of the second shuffle. Batches are
consecutive runs of the shuffled positions whatever ``preprocess_threads`` is. ``shuffle=False``: every pass is in
offset order.

The wheel's libmxnet.so is built with GCC 4.8's libstdc++, whose ``std::shuffle`` swaps position i (1 .. n-1) with
a j drawn uniformly from [0, i] by dividing one 32-bit output by ``(2^32 - 1) // (i + 1)`` after rejecting outputs
at or above ``(i + 1)`` times that quotient. numpy's legacy ``RandomState(seed)`` is the same Mersenne Twister
with the same seeding, so its raw 32-bit outputs are the splitter's. tests/data/test_record_order.py checks the
result against the real iterator.
"""
import numpy as np
from numba import njit

_SEED_OFFSET = 111                  # dmlc's IndexedRecordIOSplitter seeds its generator with this + seed
_URNG_RANGE = 0xFFFFFFFF            # max - min of std::mt19937


@njit(cache=True, nogil=True)
def _shuffle_steps(perm, raws, step):
    """Run std::shuffle's swaps from ``step`` on, drawing from ``raws``; (next step, raws used). Stops early when
    ``raws`` runs out (the caller draws more and calls again)."""
    used = 0
    while step < perm.shape[0]:
        span = step + 1
        scaling = _URNG_RANGE // span
        limit = span * scaling
        while used < raws.shape[0] and raws[used] >= limit:    # rejected: outside the evenly divisible range
            used += 1
        if used == raws.shape[0]:
            return step, used
        j = raws[used] // scaling
        used += 1
        perm[step], perm[j] = perm[j], perm[step]
        step += 1
    return step, used


class SplitterOrder:
    """The successive passes over a part of ``n`` records that ImageRecordIter makes from ``seed``: each call of
    ``next_pass()`` returns the positions (int64, 0 .. n-1 in offset order) in the order of the next pass."""

    def __init__(self, n, seed, shuffle=True):
        self.n, self.shuffle = int(n), bool(shuffle)
        # std::mt19937::seed takes the sum modulo 2^32; RandomState(int) seeds the same way
        self._generator = np.random.RandomState((_SEED_OFFSET + int(seed)) & 0xFFFFFFFF)
        self._spare = np.zeros(0, np.int64)        # drawn outputs not used yet (the next pass starts with them)

    def next_pass(self):
        perm = np.arange(self.n, dtype=np.int64)
        step = 1
        while self.shuffle and step < self.n:
            # rejections are rare (about n^2 / 2^33 in a pass): draw a little more than one output a swap
            want = self.n - step + 64 + (self.n * self.n >> 32)
            if len(self._spare) < want:
                more = self._generator.randint(0, 1 << 32, size=want - len(self._spare), dtype=np.uint32)
                self._spare = np.concatenate([self._spare, more.astype(np.int64)])
            step, used = _shuffle_steps(perm, self._spare, step)
            self._spare = self._spare[used:]
        return perm
