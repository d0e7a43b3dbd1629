"""RecordReader / open_record_set: labels, pixels, sharding, determinism, cheap exact resume, damaged files."""
import logging
import os
import struct

import numpy as np
import pytest

from recognition.data import rec_format, record_order, record_reader

SIZE = (112, 112)


def key_image(key):
    """A PNG-exact image that names its record: R = key % 256, G = key // 256 % 256, B = 200 on the left half and
    50 on the right (so a mirrored copy is told apart)."""
    img = np.empty(SIZE + (3,), np.uint8)
    img[..., 0], img[..., 1] = key % 256, key // 256 % 256
    img[:, :SIZE[1] // 2, 2], img[:, SIZE[1] // 2:, 2] = 200, 50
    return img


def write_set(folder, classes, layouts=("iter",)):
    """An images-only set whose record k has class ``classes[k]`` and the image key_image(k)."""
    prefix = os.path.join(str(folder), "train")
    with rec_format.RecordSetWriter(prefix, max(classes) + 1, SIZE, layouts) as writer:
        for key, class_id in enumerate(classes):
            writer.add(class_id, rec_format.encode_image(key_image(key), "png"))
    return prefix + "_iter.rec"


def batch_keys(batch, check_mirror=True):
    """Record keys of a batch's rows read back from the pixels; checks each row is an unaltered or mirrored
    key_image."""
    x = batch.data.asnumpy()
    keys = (x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).astype(np.int64)
    for row, key in enumerate(keys):
        ref = key_image(key).transpose(2, 0, 1).astype(np.float32)
        assert np.array_equal(x[row], ref) or (check_mirror and np.array_equal(x[row], ref[:, :, ::-1]))
    return keys


def collect(reader, epoch=0, start_step=0):
    batches = list(reader.epoch(epoch, start_step))
    return batches, [batch_keys(b) for b in batches]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """23 records, class of record k = 3 * k (so labels and keys are told apart)."""
    return write_set(tmp_path_factory.mktemp("small"), [3 * k for k in range(23)])


# ------------------------------------------------------------------------------------------------ basics
def test_reads_every_record_once_with_exact_labels_and_pixels(small_set):
    reader = record_reader.RecordReader(small_set, 5, 69, shuffle=False, rand_mirror=False, last_batch="pad")
    assert reader.uses_record_iter and reader.num_images == 23 and reader.steps_per_epoch == 5
    batches, keys = collect(reader)
    assert len(batches) == 5
    real = np.concatenate([k[:5 - b.pad] for b, k in zip(batches, keys)])
    assert np.array_equal(real, np.arange(23))                 # file order when not shuffled
    for batch, k in zip(batches, keys):
        assert batch.label.dtype == np.int64 and batch.data.dtype == np.float32
        assert batch.data.shape == (5, 3) + SIZE
        assert np.array_equal(batch.label, 3 * k)               # label of every row (pad rows too) is its own
    assert [b.pad for b in batches] == [0, 0, 0, 0, 2]


def test_batch_is_cpu_rgb_float_0_255(small_set):
    batch = next(record_reader.RecordReader(small_set, 4, 69, rand_mirror=False).epoch(0))
    x = batch.data.asnumpy()
    assert batch.data.context.device_type == "cpu"
    assert x.min() >= 0 and x.max() == 200.0                    # raw pixels, no normalisation
    assert (x[:, 2, :, :56] == 200).all()                        # blue plane stayed the blue plane (RGB order)


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_sharding_pad_mode_covers_every_image_exactly_once(small_set, num_ranks):
    readers = [record_reader.RecordReader(small_set, 4, 69, rank=r, num_ranks=num_ranks, seed=5, last_batch="pad")
               for r in range(num_ranks)]
    steps = {r.steps_per_epoch for r in readers}
    assert len(steps) == 1                                        # the same step count on every rank
    seen = []
    for reader in readers:
        batches, keys = collect(reader, epoch=2)
        assert len(batches) == reader.steps_per_epoch
        seen += [k[:4 - b.pad] for b, k in zip(batches, keys)]
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(23))


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_sharding_discard_mode_is_disjoint_with_full_batches(small_set, num_ranks):
    readers = [record_reader.RecordReader(small_set, 4, 69, rank=r, num_ranks=num_ranks, seed=1)
               for r in range(num_ranks)]
    parts = []
    for r, reader in enumerate(readers):
        start, end = record_reader.shard_bounds(23, num_ranks, r)
        batches, keys = collect(reader)
        assert len(batches) == reader.steps_per_epoch == min(
            e - s for s, e in (record_reader.shard_bounds(23, num_ranks, q) for q in range(num_ranks))) // 4
        assert all(b.pad == 0 for b in batches)
        mine = np.concatenate(keys)
        assert ((mine >= start) & (mine < end)).all()             # the rank's own part
        parts.append(mine)
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)           # no image on two ranks or twice


def test_tiny_parts_use_python_path_and_keep_step_counts(tmp_path):
    rec = write_set(tmp_path, list(range(7)))                       # parts of 3, 3, 1 records for 3 ranks
    readers = [record_reader.RecordReader(rec, 4, 7, rank=r, num_ranks=3, last_batch="pad") for r in range(3)]
    assert [r.uses_record_iter for r in readers] == [False, False, False]
    seen = []
    for reader in readers:
        batches, keys = collect(reader)
        assert len(batches) == reader.steps_per_epoch == 1
        seen += [k[:4 - b.pad] for b, k in zip(batches, keys)]
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(7))
    # discard mode: no part holds a full batch, so no step at all (the trainer refuses that)
    assert record_reader.RecordReader(rec, 4, 7, rank=0, num_ranks=3).steps_per_epoch == 0


def test_pad_mode_all_padding_batch_when_a_part_runs_out(tmp_path):
    rec = write_set(tmp_path, list(range(18)))                      # parts of 9 and 9 -> 5, 4 records for 4 ranks
    readers = [record_reader.RecordReader(rec, 2, 18, rank=r, num_ranks=4, last_batch="pad") for r in range(4)]
    assert {r.steps_per_epoch for r in readers} == {3}               # ceil(5 / 2)
    seen = []
    for reader in readers:
        batches, keys = collect(reader)
        seen += [k[:2 - b.pad] for b, k in zip(batches, keys)]
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(18))
    last = list(readers[3].epoch(0))[-1]                             # 4 records: the third batch is all padding
    assert last.pad == 2


def test_class_ids_above_2_24_are_exact(tmp_path):
    classes = [2 ** 24 + 1, 2 ** 31 + 5, 7, 2 ** 40 + 3, 2 ** 24 - 1, 2 ** 24, 12345678901]
    rec = write_set(tmp_path, classes)
    assert float(np.float32(2 ** 24 + 1)) != 2 ** 24 + 1              # float32 alone would lose these
    reader = record_reader.RecordReader(rec, 7, 2 ** 41, shuffle=False)
    batch = next(reader.epoch(0))
    assert batch.label.tolist() == classes


def horovod_ranks_body(rec):
    """Each Horovod rank reads its own part, as the trainer does; returns (steps, keys of real rows)."""
    import horovod.mxnet as hvd
    reader = record_reader.RecordReader(rec, 4, 69, rank=hvd.rank(), num_ranks=hvd.size(), seed=2, last_batch="pad")
    keys = [batch_keys(b)[:4 - b.pad] for b in reader.epoch(1)]
    return reader.steps_per_epoch, np.concatenate(keys)


def test_two_horovod_ranks_split_the_epoch(small_set):
    from tests.harness import run_ranks
    results = run_ranks(horovod_ranks_body, np=2, timeout=120, kwargs={"rec": small_set})
    assert results[0][0] == results[1][0]
    assert np.array_equal(np.sort(np.concatenate([keys for _, keys in results])), np.arange(23))
    assert set(results[0][1]) == set(range(12))                     # rank 0: the first ceil(23 / 2) records


def test_an_epoch_left_early_does_not_disturb_the_next(small_set):
    reader = record_reader.RecordReader(small_set, 4, 69, seed=3)
    first = reader.epoch(0)
    next(first), next(first)
    first.close()                                                      # the trainer stops mid-epoch at max_steps
    _, keys = collect(reader, epoch=1)
    _, fresh = collect(record_reader.RecordReader(small_set, 4, 69, seed=3), epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(keys, fresh))


# ------------------------------------------------------------------------------------------------ determinism
def test_resume_mid_epoch_yields_the_same_batches(small_set):
    full, full_keys = collect(record_reader.RecordReader(small_set, 4, 69, seed=3, preprocess_threads=2), epoch=1)
    resumed, resumed_keys = collect(record_reader.RecordReader(small_set, 4, 69, seed=3, preprocess_threads=1),
                                    epoch=1, start_step=3)
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert np.array_equal(a.data.asnumpy(), b.data.asnumpy())   # images and mirror flags
        assert np.array_equal(a.label, b.label)


def assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert np.array_equal(a.data.asnumpy(), b.data.asnumpy())   # images, pad rows and mirror flags
        assert np.array_equal(a.label, b.label) and a.pad == b.pad


def check_resume_at_every_step(make_reader, epoch):
    """epoch(epoch, S) of a fresh reader (a restarted process) must be the uninterrupted pass from S on, for every
    S; returns the uninterrupted pass."""
    full = list(make_reader().epoch(epoch))
    assert len(full) >= 3
    for start in range(1, len(full)):
        assert_same_batches(full[start:], list(make_reader().epoch(epoch, start)))
    return full


def write_jpeg_set(folder, count):
    """``count`` smooth colour JPEGs (4:2:0 chroma, as OpenCV writes them): what the resumed pass decodes with OpenCV
    must be, to the bit, what ImageRecordIter decodes with its own libjpeg-turbo."""
    prefix = os.path.join(str(folder), "train")
    yy, xx = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    noise = np.random.default_rng(0).integers(0, 24, SIZE + (3,))
    with rec_format.RecordSetWriter(prefix, count, SIZE, ("iter",)) as writer:
        for key in range(count):
            img = np.stack([2 * xx + 7 * key, 2 * yy, xx + yy + 31 * key], -1) % 200 + noise
            writer.add(key, rec_format.encode_image(img.astype(np.uint8), "jpg", 90))
    return prefix + "_iter.rec"


def test_resume_on_the_record_iter_path_is_exact_at_every_step_and_rank(tmp_path):
    rec = write_jpeg_set(tmp_path, 18)                 # 4 ranks: parts of 5, 5, 5, 3 records, batches of 2
    pads = []
    for rank in range(4):
        def make():
            return record_reader.RecordReader(rec, 2, 18, rank=rank, num_ranks=4, seed=8, last_batch="pad")
        assert make().uses_record_iter
        pads += [batch.pad for batch in check_resume_at_every_step(make, epoch=1)]
    assert 1 in pads and 2 in pads                     # covered: round_batch's pad rows and an all-padding batch


def test_resume_reads_only_the_records_from_its_step_on(small_set, monkeypatch):
    reader = record_reader.RecordReader(small_set, 4, 69, seed=3)            # 23 records: 5 steps of 4
    monkeypatch.setattr(reader, "_make_iter", lambda epoch: pytest.fail("a resume must not run ImageRecordIter"))
    decoded, decode = [], rec_format.decode_image
    monkeypatch.setattr(rec_format, "decode_image", lambda payload, size: decoded.append(1) or decode(payload, size))
    assert len(list(reader.epoch(1, start_step=4))) == 1 and len(decoded) == 4
    del decoded[:]
    _, keys = collect(reader, epoch=1, start_step=2)
    order = record_order.SplitterOrder(23, record_reader.mix_seed(3, 1)).next_pass()
    assert len(decoded) == 12 and np.array_equal(np.concatenate(keys), order[8:20])


def test_resume_is_exact_before_and_after_a_damaged_record(tmp_path):
    rec = write_set(tmp_path, list(range(30)))
    with open(rec, "r+b") as f:                        # record 11 loses its RecordIO magic
        f.seek(int(_offsets(rec)[11]))
        f.write(b"\0\0\0\0")

    def make():
        return record_reader.RecordReader(rec, 4, 30, seed=6, last_batch="pad", max_damaged=1.0)   # 1 of 30
    assert not make().uses_record_iter
    full = check_resume_at_every_step(make, epoch=2)
    order = record_order.SplitterOrder(30, record_reader.mix_seed(6, 2)).next_pass()
    step = int(np.flatnonzero(order == 11)[0]) // 4
    assert 0 < step < len(full) - 1                    # resumes before and after the damaged record's step
    assert full[step].pad == 1
    mine = order[4 * step:4 * step + 4]
    assert np.array_equal(batch_keys(full[step])[:3], mine[mine != 11])   # the others moved up, in order


def test_resume_is_exact_before_and_after_an_undecodable_image(tmp_path):
    rec = write_set(tmp_path, list(range(40)))
    with open(rec, "r+b") as f:                        # record 17: framing intact, the PNG garbled
        f.seek(int(_offsets(rec)[17]) + 8 + rec_format.IR_SIZE + 16)
        f.write(b"\0" * 64)

    def make():
        return record_reader.RecordReader(rec, 8, 40, seed=6, last_batch="pad")
    assert make().uses_record_iter                     # the uninterrupted pass: ImageRecordIter, then Python
    full = check_resume_at_every_step(make, epoch=0)
    order = record_order.SplitterOrder(40, record_reader.mix_seed(6, 0)).next_pass()
    step = int(np.flatnonzero(order == 17)[0]) // 8
    assert 0 < step < len(full) - 1 and full[step].pad == 1
    assert 17 not in batch_keys(full[step])


def test_epochs_shuffle_and_mirror_differently(small_set):
    reader = record_reader.RecordReader(small_set, 4, 69, seed=3)
    _, keys0 = collect(reader, epoch=0)
    _, keys1 = collect(reader, epoch=1)
    assert not np.array_equal(np.concatenate(keys0), np.concatenate(keys1))
    x = np.concatenate([b.data.asnumpy() for b in reader.epoch(0)])
    mirrored = (x[:, 2, 0, 0] == 50).mean()                           # right-half colour now on the left
    assert 0.15 < mirrored < 0.85
    _, other_seed = collect(record_reader.RecordReader(small_set, 4, 69, seed=4), epoch=0)
    assert not np.array_equal(np.concatenate(keys0), np.concatenate(other_seed))


# ------------------------------------------------------------------------------------------------ bad input
def test_open_record_set_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_iter.rec"):
        record_reader.open_record_set(str(tmp_path))
    write_set(tmp_path, [0, 1, 2], layouts=("insightface",))         # InsightFace layout only
    with pytest.raises(FileNotFoundError, match="convert_rec.py %s" % os.path.join(str(tmp_path), "train")):
        record_reader.open_record_set(str(tmp_path))
    write_set(tmp_path, [0, 1, 2], layouts=("insightface", "iter"))
    found = record_reader.open_record_set(str(tmp_path))
    assert (found["num_classes"], found["num_images"], found["image_size"]) == (3, 3, SIZE)
    os.remove(os.path.join(str(tmp_path), "property"))
    with pytest.raises(FileNotFoundError, match="property"):
        record_reader.open_record_set(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothere.rec"):
        record_reader.RecordReader(os.path.join(str(tmp_path), "nothere.rec"), 2, 3)
    os.remove(os.path.join(str(tmp_path), "train_iter.idx"))
    with pytest.raises(FileNotFoundError, match="train_iter.idx"):
        record_reader.RecordReader(os.path.join(str(tmp_path), "train_iter.rec"), 2, 3)


def test_insightface_file_is_refused_so_header_records_never_reach_a_batch(tmp_path):
    write_set(tmp_path, [0, 0, 1, 2], layouts=("insightface",))
    with pytest.raises(ValueError, match="convert_rec.py"):
        record_reader.RecordReader(os.path.join(str(tmp_path), "train.rec"), 2, 3)


def test_class_id_out_of_range_names_the_record(tmp_path):
    rec = write_set(tmp_path, [0, 1, 2, 9, 4])
    with pytest.raises(ValueError, match=r"record 3 .*class id 9 >= num_classes 5"):
        record_reader.RecordReader(rec, 2, 5)


def _offsets(rec):
    return rec_format.read_index(rec_format.index_path(rec))[1]


def test_undecodable_image_is_skipped_and_counted_mid_epoch(tmp_path, caplog):
    rec = write_set(tmp_path, list(range(40)))
    offset = int(_offsets(rec)[17])
    with open(rec, "r+b") as f:                                       # garble the PNG bytes, keep the framing
        f.seek(offset + 8 + rec_format.IR_SIZE + 16)
        f.write(b"\0" * 64)
    reader = record_reader.RecordReader(rec, 8, 40, last_batch="pad", preprocess_threads=2)
    assert reader.uses_record_iter                                    # the header check cannot see it
    with caplog.at_level(logging.WARNING, logger="recognition.data"):
        batches, keys = collect(reader)
    assert len(batches) == reader.steps_per_epoch == 5
    real = np.concatenate([k[:8 - b.pad] for b, k in zip(batches, keys)])
    assert np.array_equal(np.sort(real), np.delete(np.arange(40), 17))
    assert reader.skipped == 1
    assert "skipped record 17" in caplog.text and "ImageRecordIter failed" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "truncated_many", "bad_magic", "bad_length"])
def test_damaged_framing_is_skipped_without_crashing(tmp_path, damage, caplog):
    rec = write_set(tmp_path, list(range(30)))
    offsets = _offsets(rec)
    victims = {"truncated": [29], "truncated_many": [25, 26, 27, 28, 29]}.get(damage, [11])
    with open(rec, "r+b") as f:
        if damage.startswith("truncated"):                              # the copy stopped inside a record
            f.truncate(int(offsets[victims[0]]) + 100)
        elif damage == "bad_magic":
            f.seek(int(offsets[11]))
            f.write(b"\0\0\0\0")
        else:
            f.seek(int(offsets[11]) + 4)
            f.write(struct.pack("<I", 1 << 20))
    with caplog.at_level(logging.WARNING, logger="recognition.data"):
        reader = record_reader.RecordReader(rec, 4, 30, rank=0, num_ranks=1, last_batch="pad", max_damaged=1.0)
        assert not reader.uses_record_iter                            # MXNet would abort on this file
        batches, keys = collect(reader)
    real = np.concatenate([k[:4 - b.pad] for b, k in zip(batches, keys)])
    assert np.array_equal(np.sort(real), np.delete(np.arange(30), victims))
    assert len(batches) == reader.steps_per_epoch == 8
    assert reader.skipped == len(victims) and "%d damaged record(s)" % len(victims) in caplog.text


def test_more_damage_than_max_damaged_is_refused_naming_the_file_and_bytes(tmp_path):
    rec = write_set(tmp_path, list(range(300)))
    offsets = _offsets(rec)
    with open(rec, "r+b") as f:                       # 4 of 300 records lose their magic: 1.3 %
        for k in (40, 41, 90, 200):
            f.seek(int(offsets[k]))
            f.write(b"\0\0\0\0")
    with pytest.raises(ValueError) as err:
        record_reader.RecordReader(rec, 4, 300)
    message = str(err.value)
    assert rec in message and "4 of the 300 records of rank 0" in message and "--max-damaged 0.01" in message
    assert "first at bytes %d, %d, %d" % (offsets[40], offsets[41], offsets[90]) in message
    assert record_reader.RecordReader(rec, 4, 300, max_damaged=0.02).skipped == 4      # within a looser limit


def test_an_index_entry_past_the_end_is_blamed_on_the_index(tmp_path, caplog):
    """Key 10's offset rewritten past the end of the file: the index is damaged, not train_iter.rec. Its record
    is skipped and the rest read normally; with --max-damaged 0 the reader refuses, naming the .idx."""
    rec = write_set(tmp_path, list(range(300)))
    idx = rec_format.index_path(rec)
    lines = open(idx).read().split("\n")
    lines[10] = "10\t88888888888"
    open(idx, "w").write("\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="recognition.data"):
        reader = record_reader.RecordReader(rec, 4, 300, shuffle=False, rand_mirror=False, last_batch="pad")
    assert reader.index_damaged == 1 and reader.skipped == 0 and not reader.uses_record_iter
    assert idx in caplog.text and "the index is damaged, not the record file" in caplog.text
    assert "key 10 at byte 88888888888" in caplog.text
    batches, keys = collect(reader)
    real = np.concatenate([k[:4 - b.pad] for b, k in zip(batches, keys)])
    assert np.array_equal(np.sort(real), np.delete(np.arange(300), 10))
    with pytest.raises(ValueError, match="train_iter.idx: 1 of its 300 entries point outside"):
        record_reader.RecordReader(rec, 4, 300, max_damaged=0.0)


def test_image_size_mismatch_is_an_error(small_set):
    with pytest.raises(ValueError, match="image_size"):
        record_reader.RecordReader(small_set, 4, 69, image_size=(112, 96))


def test_parameter_errors(small_set):
    with pytest.raises(ValueError, match="last_batch"):
        record_reader.RecordReader(small_set, 4, 69, last_batch="wrap")
    with pytest.raises(ValueError, match="rank"):
        record_reader.RecordReader(small_set, 4, 69, rank=2, num_ranks=2)
    with pytest.raises(ValueError, match="start_step"):
        next(record_reader.RecordReader(small_set, 4, 69).epoch(0, start_step=99))
