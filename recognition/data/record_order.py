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
with the same seeding, so its raw 32-bit outputs are the splitter's. Everything is vectorised (about 1 s of CPU
for a part of 2 M records, 5 ms for 20 k); tests/data/test_record_order.py checks the result against a plain
loop and against the real iterator.
"""
import numpy as np

_SEED_OFFSET = 111                  # dmlc's IndexedRecordIOSplitter seeds its generator with this + seed
_URNG_RANGE = 0xFFFFFFFF            # max - min of std::mt19937
_BLOCK = 8192                       # swap targets drawn per vectorised round (a rejection restarts the round)


class SplitterOrder:
    """The successive passes over a part of ``n`` records that ImageRecordIter makes from ``seed``: each call of
    ``next_pass()`` returns the positions (int64, 0 .. n-1 in offset order) in the order of the next pass."""

    def __init__(self, n, seed, shuffle=True):
        self.n, self.shuffle = int(n), bool(shuffle)
        # std::mt19937::seed takes the sum modulo 2^32; RandomState(int) seeds the same way
        self._generator = np.random.RandomState((_SEED_OFFSET + int(seed)) & 0xFFFFFFFF)
        self._spare = np.zeros(0, np.int64)        # drawn outputs not used yet (the next pass starts with them)

    def next_pass(self):
        if not self.shuffle or self.n < 2:
            return np.arange(self.n, dtype=np.int64)
        return _apply_swaps(self._swap_targets())

    def _swap_targets(self):
        """targets[i]: the position std::shuffle swaps with position i at its step i (1 .. n-1; targets[0] = 0)."""
        targets = np.zeros(self.n, np.int64)
        step = 1
        while step < self.n:
            count = min(self.n - step, _BLOCK)
            if len(self._spare) < count:
                more = self._generator.randint(0, 1 << 32, size=max(count, 1 << 16), dtype=np.uint32)
                self._spare = np.concatenate([self._spare, more.astype(np.int64)])
            raws = self._spare[:count]
            span = np.arange(step + 1, step + count + 1, dtype=np.int64)        # draw from [0, step]
            scaling = _URNG_RANGE // span
            rejected = np.flatnonzero(raws >= span * scaling)                    # rare: about n^2 / 2^33 a pass
            accepted = int(rejected[0]) if rejected.size else count
            targets[step:step + accepted] = raws[:accepted] // scaling[:accepted]
            step += accepted
            self._spare = self._spare[accepted + (1 if rejected.size else 0):]
        return targets


def _apply_swaps(targets):
    """0 .. n-1 after swapping positions i and targets[i] for i = 1 .. n-1 in turn, without a loop over the steps.

    Position i still holds i when step i comes (earlier steps only touch positions up to their own), so step i with
    t = targets[i] < i writes i at t and moves what t held to i. Hence position p ends with the last step i > p
    whose target is p, if there is one; otherwise with what it got at its own step: p itself when targets[p] == p,
    else what t = targets[p] held just before step p, which is the previous step i' (t < i' < p) with target t, or,
    when there is none, what t got at its own step. That last case recurses to a smaller position; pointer jumping
    resolves every position's chain at once in about log2(chain length) rounds.
    """
    n = len(targets)
    steps = np.arange(n, dtype=np.int64)
    movers = np.flatnonzero(targets < steps)                          # steps that swap two different positions
    writers = movers[np.argsort(targets[movers] * n + movers)]        # grouped by target, in step order
    written = targets[writers]
    same = written[1:] == written[:-1]
    previous = np.full(n, -1, np.int64)                               # previous step that wrote the same target
    previous[writers[1:][same]] = writers[:-1][same]
    group_end = np.ones(len(writers), bool)
    group_end[:-1] = ~same
    last = np.full(n, -1, np.int64)                                   # last step that wrote each position
    last[written[group_end]] = writers[group_end]

    stays = targets == steps
    got = np.where(stays, steps, previous)                            # what each position got at its own step
    known = stays | (previous >= 0)
    pointer = targets.copy()
    todo = np.flatnonzero(~known)
    while todo.size:
        ahead = pointer[todo]
        ready = known[ahead]
        got[todo[ready]] = got[ahead[ready]]
        known[todo[ready]] = True
        todo = todo[~ready]
        pointer[todo] = pointer[pointer[todo]]
    return np.where(last >= 0, last, got)
