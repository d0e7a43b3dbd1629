"""record_order: the splitter's shuffle against a plain reference and against MXNet's own ImageRecordIter."""
import os

import mxnet as mx
import numpy as np
import pytest

from recognition.data import rec_format, record_order, record_reader

TINY = (8, 8)


def reference_passes(n, passes, generator):
    """libstdc++ 4.8's std::shuffle of 0..n-1, one output of ``generator`` at a time, ``passes`` times in a row."""
    out = []
    for _ in range(passes):
        perm = list(range(n))
        for i in range(1, n):
            scaling = (2 ** 32 - 1) // (i + 1)
            while True:
                raw = int(generator.randint(0, 2 ** 32, dtype=np.uint32))
                if raw < (i + 1) * scaling:
                    break
            j = raw // scaling
            perm[i], perm[j] = perm[j], perm[i]
        out.append(perm)
    return out


class Scripted:
    """A stand-in generator that gives ``values`` (then zeros) as its 32-bit outputs."""

    def __init__(self, values):
        self.values, self.used = list(values), 0

    def randint(self, low, high, size=None, dtype=None):
        take = self.values[self.used:self.used + (size or 1)]
        take += [0] * ((size or 1) - len(take))
        self.used += size or 1
        return np.array(take, np.uint32) if size else np.uint32(take[0])


def test_generator_is_std_mt19937():
    # the C++ standard's check: the 10000th output of a default-constructed std::mt19937 (seed 5489) is 4123659995
    raws = np.random.RandomState(5489).randint(0, 2 ** 32, size=10000, dtype=np.uint32)
    assert raws[-1] == 4123659995


@pytest.mark.parametrize("n, seed", [(0, 1), (1, 1), (2, 7), (23, 3), (1000, 12345), (300, 2 ** 31 - 1),
                                     (20000, 5)])
def test_passes_match_the_plain_reference(n, seed):
    order = record_order.SplitterOrder(n, seed)
    for expected in reference_passes(n, 2, np.random.RandomState((111 + seed) % 2 ** 32)):
        assert order.next_pass().tolist() == expected


def test_rejected_outputs_are_skipped_as_std_shuffle_skips_them():
    # 2^32 - 1 is at or above the accepted range for every span that does not divide it (rare with real outputs)
    values = np.random.RandomState(4).randint(0, 2 ** 32, size=400, dtype=np.uint32).tolist()
    for at in (0, 1, 2, 50, 51, 120, 199, 200, 201):
        values.insert(at, 2 ** 32 - 1)
    order = record_order.SplitterOrder(150, 0)
    order._generator = Scripted(values)
    for expected in reference_passes(150, 2, Scripted(values)):
        assert order.next_pass().tolist() == expected


@pytest.mark.parametrize("shape", ["random", "chain", "all_to_zero", "no_swaps"])
def test_vectorised_swaps_match_a_plain_loop(shape):
    n = 3000
    targets = {"random": (np.random.default_rng(1).random(n) * (np.arange(n) + 1)).astype(np.int64),
               "chain": np.maximum(np.arange(n) - 1, 0),              # every step swaps with its neighbour
               "all_to_zero": np.zeros(n, np.int64), "no_swaps": np.arange(n)}[shape]
    perm = list(range(n))
    for i in range(1, n):
        perm[i], perm[targets[i]] = perm[targets[i]], perm[i]
    assert record_order._apply_swaps(targets).tolist() == perm


def test_no_shuffle_is_offset_order():
    order = record_order.SplitterOrder(5, 3, shuffle=False)
    assert order.next_pass().tolist() == order.next_pass().tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ real iterator
@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """61 records of 8x8 PNGs; the label carries the record's key."""
    prefix = os.path.join(str(tmp_path_factory.mktemp("order")), "train")
    with rec_format.RecordSetWriter(prefix, 61, TINY, ("iter",)) as writer:
        for key in range(61):
            writer.add(key, rec_format.encode_image(np.full(TINY + (3,), key, np.uint8), "png"))
    return prefix + "_iter.rec"


def iterator_keys(rec, seed, batch_size, part, parts, shuffle):
    """Keys of every row (pad rows too) that mx.io.ImageRecordIter gives for one pass over a part."""
    it = mx.io.ImageRecordIter(path_imgrec=rec, path_imgidx=rec_format.index_path(rec), data_shape=(3,) + TINY,
                               batch_size=batch_size, label_width=4, shuffle=shuffle, seed=seed, part_index=part,
                               num_parts=parts, round_batch=True, preprocess_threads=2, verbose=False)
    return np.concatenate([rec_format.decode_iter_labels(batch.label[0].asnumpy())[1] for batch in it])


@pytest.mark.parametrize("parts, seed, batch_size, shuffle", [(1, 0, 8, True), (1, 987654321, 7, True),
                                                               (2, 5, 8, True), (3, 2 ** 31 - 1, 6, True),
                                                               (2, 5, 8, False)])
def test_order_is_image_record_iter_order(tiny_set, parts, seed, batch_size, shuffle):
    for part in range(parts):
        start, end = record_reader.shard_bounds(61, parts, part)
        order = record_order.SplitterOrder(end - start, seed, shuffle)
        first = order.next_pass()
        wrap = order.next_pass()[:batch_size - len(first) % batch_size]   # round_batch ends the part with these
        expected = start + np.concatenate([first, wrap])
        assert len(first) % batch_size                          # every case has a wrapped last batch
        assert np.array_equal(iterator_keys(tiny_set, seed, batch_size, part, parts, shuffle), expected)
