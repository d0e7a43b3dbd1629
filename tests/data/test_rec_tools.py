"""tools/pack_rec.py and tools/convert_rec.py, and the layouts of recognition/data/rec_format.py."""
import logging
import os
import re
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest

from recognition.data import identity_index, rec_format, record_reader
from tests.data.test_id_loader import brute_force_index
from tests.harness import ROOT
from tools import convert_rec, pack_rec


def smooth_image(rng):
    """A smooth random RGB image (JPEG keeps it within a few levels)."""
    small = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    return cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)


@pytest.fixture
def image_dir(tmp_path):
    """4 identities with 3, 1, 4, 2 images (PNG sources); returns (folder, {(class, name): RGB image})."""
    rng = np.random.default_rng(0)
    folder, images = tmp_path / "faces", {}
    for class_id, (name, count) in enumerate([("alice", 3), ("bob", 1), ("carol", 4), ("dave", 2)]):
        (folder / name).mkdir(parents=True)
        for k in range(count):
            rgb = smooth_image(rng)
            cv2.imwrite(str(folder / name / ("%02d.png" % k)), rgb[:, :, ::-1])
            images[(class_id, k)] = rgb
    return str(folder), images


def read_insightface(prefix):
    """(header label, [(class float label, RGB)], [identity (start, end)]) read the way InsightFace tools do."""
    rec = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "r")
    header, _ = mx.recordio.unpack(rec.read_idx(0))
    first_identity, end = (int(v) for v in header.label)
    images = []
    for key in range(1, first_identity):
        h, payload = mx.recordio.unpack(rec.read_idx(key))
        images.append((h.label, mx.image.imdecode(payload).asnumpy()))
    identities = [tuple(int(v) for v in mx.recordio.unpack(rec.read_idx(k))[0].label)
                  for k in range(first_identity, end)]
    return header.label, images, identities


def iter_batches(prefix, num_classes, batch_size):
    reader = record_reader.RecordReader(prefix + "_iter.rec", batch_size, num_classes, shuffle=False, rand_mirror=False,
                                  last_batch="pad")
    labels, data = [], []
    for batch in reader.epoch(0):
        real = batch_size - batch.pad
        labels.append(batch.label[:real])
        data.append(batch.data.asnumpy()[:real])
    return np.concatenate(labels), np.concatenate(data)


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("encoding", ["jpg", "png"])
def test_pack_writes_both_layouts_with_exact_labels(image_dir, tmp_path, encoding):
    folder, images = image_dir
    prefix = str(tmp_path / "out" / "train")
    summary = pack_rec.pack(folder, prefix, encoding=encoding, workers=2, progress=False)
    assert summary == {"num_images": 10, "num_classes": 4, "skipped": 0, "resized": 0, "dropped_identities": 0}
    assert open(str(tmp_path / "out" / "property")).read().strip() == "4,112,112"
    expected = [images[key] for key in sorted(images)]                  # class order, then file name order
    classes = [c for c, _ in sorted(images)]
    header, records, identities = read_insightface(prefix)
    assert list(header) == [11, 15]                                     # (N + 1, N + 1 + C)
    assert identities == [(1, 4), (4, 5), (5, 9), (9, 11)]
    assert [label for label, _ in records] == classes
    tolerance = 0 if encoding == "png" else 3.0
    for (_, got), want in zip(records, expected):
        assert np.abs(got.astype(float) - want).mean() <= tolerance
    labels, data = iter_batches(prefix, 4, 3)                          # the images-only copy, through the reader
    assert labels.tolist() == classes
    for got, want in zip(data, expected):
        assert np.abs(got.transpose(1, 2, 0) - want).mean() <= tolerance


def test_pack_skips_unreadable_files_and_resizes(image_dir, tmp_path, caplog):
    folder, _ = image_dir
    with open(os.path.join(folder, "bob", "broken.jpg"), "wb") as f:
        f.write(b"not an image")
    cv2.imwrite(os.path.join(folder, "dave", "big.png"), np.full((150, 130, 3), 90, np.uint8))
    prefix = str(tmp_path / "train")
    summary = pack_rec.pack(folder, prefix, layouts=("iter",), workers=1, progress=False)
    assert summary == {"num_images": 11, "num_classes": 4, "skipped": 1, "resized": 1, "dropped_identities": 0}
    assert "broken.jpg" in caplog.text
    assert not os.path.exists(prefix + ".rec")                          # --layout iter: images-only files only
    labels, data = iter_batches(prefix, 4, 4)
    assert labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3]
    assert np.abs(data[-1] - 90).max() <= 2                             # big.png sorts last in dave/


def test_pack_bad_input_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pack_rec.pack(str(tmp_path / "nowhere"), str(tmp_path / "x"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no identity sub-folders"):
        pack_rec.pack(str(tmp_path / "empty"), str(tmp_path / "x"), progress=False)


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_pack_skips_empty_files_and_folders_and_renumbers(image_dir, tmp_path, caplog):
    """A zero-byte .jpg is skipped and named; an identity folder without image files, and one whose only image
    does not decode, are skipped with a warning and the identities after them renumbered without gaps."""
    folder, images = image_dir
    open(os.path.join(folder, "alice", "zero.jpg"), "wb").close()
    os.makedirs(os.path.join(folder, "anna"))                               # sorts between alice and bob
    with open(os.path.join(folder, "anna", "notes.txt"), "w") as f:
        f.write("not an image file")
    os.makedirs(os.path.join(folder, "beth"))                               # between bob and carol
    with open(os.path.join(folder, "beth", "only.png"), "wb") as f:
        f.write(b"\x89PNG damaged")
    prefix = str(tmp_path / "out" / "train")
    summary = pack_rec.pack(folder, prefix, workers=2, progress=False)
    assert summary == {"num_images": 10, "num_classes": 4, "skipped": 2, "resized": 0, "dropped_identities": 1}
    assert "zero.jpg: empty file" in caplog.text and "only.png: does not decode" in caplog.text
    assert "without image files" in caplog.text and "anna" in caplog.text
    assert "none of whose images decodes" in caplog.text and "beth" in caplog.text
    header, records, identities = read_insightface(prefix)
    assert [label for label, _ in records] == [c for c, _ in sorted(images)]       # alice 0, bob 1, carol 2, dave 3
    assert identities == [(1, 4), (4, 5), (5, 9), (9, 11)]
    assert rec_format.read_property(rec_format.property_path(prefix)) == (4, 112, 112)
    labels, _ = iter_batches(prefix, 4, 5)
    assert labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]


def test_pack_cli_errors_are_one_line_and_keep_older_outputs(image_dir, tmp_path, capsys):
    folder, _ = image_dir
    out = tmp_path / "out"
    assert pack_rec.main([folder, str(out / "train"), "--workers", "1"]) == 0
    before = folder_bytes(str(out))
    bad = tmp_path / "bad"
    for name in ("x", "y"):
        (bad / name).mkdir(parents=True)
        (bad / name / "a.jpg").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for source, message in ((bad, "%s: none of its 2 image files decodes (first: %s: empty file)"
                             % (bad, bad / "x" / "a.jpg")),
                            (tmp_path / "empty", "%s has no identity sub-folders" % (tmp_path / "empty")),
                            (tmp_path / "nowhere", "image folder not found: %s" % (tmp_path / "nowhere"))):
        assert pack_rec.main([str(source), str(out / "train"), "--workers", "1"]) == 1
        err = capsys.readouterr().err
        assert "pack_rec: error: " + message in err and "Traceback" not in err, err
        assert folder_bytes(str(out)) == before                              # older outputs untouched, no temporaries
    for argv in (["--quality", "101"], ["--workers", "0"], ["--image-size", "112,0"]):
        with pytest.raises(SystemExit):
            pack_rec.main([folder, str(out / "train")] + argv)
        assert "error: argument " + argv[0] in capsys.readouterr().err


def test_pack_cli_help_says_both_layouts():
    out = subprocess.run([sys.executable, "tools/pack_rec.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "BOTH layouts" in out and "OUT_PREFIX_iter.rec" in out


# ------------------------------------------------------------------------------------------------ conversion
def write_insightface(prefix, classes, payloads, num_classes, header=True):
    """An InsightFace-layout file built here with MXNet's own writer: header, images (flag 0), identities."""
    writer = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
    n = len(classes)
    if header:
        writer.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b""))
    for key, (class_id, payload) in enumerate(zip(classes, payloads), start=1):
        writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(class_id), key, 0), payload))
    for c in range(num_classes):
        keys = [k for k, cls in enumerate(classes, start=1) if cls == c]
        writer.write_idx(n + 1 + c, mx.recordio.pack(mx.recordio.IRHeader(2, [keys[0], keys[-1] + 1], 0, 0), b""))
    writer.close()


def coded_png(key):
    img = np.zeros((112, 112, 3), np.uint8)
    img[..., 0], img[..., 1] = key % 256, key // 256
    return rec_format.encode_image(img, "png")


@pytest.fixture
def insightface_set(tmp_path):
    """12 images of 4 classes in InsightFace's layout, with property; returns (prefix, classes)."""
    classes = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    prefix = str(tmp_path / "src" / "train")
    os.makedirs(os.path.dirname(prefix))
    write_insightface(prefix, classes, [coded_png(k) for k in range(len(classes))], 4)
    rec_format.write_property(rec_format.property_path(prefix), 4, (112, 112))
    return prefix, classes


def keys_of(data):
    return (data[:, 0, 0, 0] + 256 * data[:, 1, 0, 0]).astype(int)


def test_convert_keeps_images_only_with_exact_labels(insightface_set):
    prefix, classes = insightface_set
    summary = convert_rec.convert(prefix, workers=2, progress=False)
    assert summary == {"num_images": 12, "num_classes": 4, "damaged": 0, "non_image": 5}   # header + 4 identities
    labels, data = iter_batches(prefix, 4, 5)
    assert labels.tolist() == classes                                   # header / identity records never appear
    assert keys_of(data).tolist() == list(range(12))
    assert rec_format.read_property(rec_format.property_path(prefix)) == (4, 112, 112)


def test_convert_shuffled_to_another_folder_is_seeded(insightface_set, tmp_path):
    prefix, classes = insightface_set
    orders = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        dst = str(tmp_path / name / "train")
        convert_rec.convert(prefix, dst, shuffle=True, seed=seed, workers=1, progress=False)
        labels, data = iter_batches(dst, 4, 4)
        keys = keys_of(data)
        assert sorted(keys.tolist()) == list(range(12))
        assert labels.tolist() == [classes[k] for k in keys]            # every label still with its image
        assert rec_format.read_property(rec_format.property_path(dst)) == (4, 112, 112)
        orders.append(keys.tolist())
    assert orders[0] == orders[1] != orders[2] and orders[0] != list(range(12))


def test_convert_skips_and_counts_damaged_records(tmp_path, caplog):
    classes = [0, 0, 1, 1, 1, 2, 2, 2]
    payloads = [coded_png(k) for k in range(8)]
    payloads[2] = b"\x89PNG but not really"
    prefix = str(tmp_path / "train")
    write_insightface(prefix, classes, payloads, 3)
    offsets = dict(zip(*rec_format.read_index(prefix + ".idx")))
    with open(prefix + ".rec", "r+b") as f:                             # break the framing of image key 6
        f.seek(int(offsets[6]))
        f.write(b"\0\0\0\0")
    summary = convert_rec.convert(prefix, workers=1, progress=False)  # no property: classes from the header
    assert summary["damaged"] == 2 and summary["num_images"] == 6 and summary["num_classes"] == 3
    assert "skipped record 3" in caplog.text and "skipped record 6" in caplog.text
    labels, data = iter_batches(prefix, 3, 4)
    assert keys_of(data).tolist() == [0, 1, 3, 4, 6, 7]                # image keys 1..8 minus 3 and 6, 0-based
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_convert_label_out_of_range_names_the_record(insightface_set):
    prefix, _ = insightface_set
    rec_format.write_property(rec_format.property_path(prefix), 3, (112, 112))
    with pytest.raises(ValueError, match=r"record 10 has class id 3 >= num_classes 3"):
        convert_rec.convert(prefix, workers=1, progress=False)
    assert not os.path.exists(prefix + "_iter.rec")                    # nothing half-written is left


def test_convert_of_random_bytes_fails_and_keeps_the_good_outputs(insightface_set, capsys):
    """A train.rec of random bytes: exit status 1, one line naming the file, and the train_iter.* files, the
    identity index and property converted before are left exactly as they were."""
    prefix, _ = insightface_set
    folder = os.path.dirname(prefix)
    assert convert_rec.main([prefix, "--workers", "1"]) == 0
    before = folder_bytes(folder)
    size = os.path.getsize(prefix + ".rec")
    with open(prefix + ".rec", "wb") as f:
        f.write(np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes())
    assert convert_rec.main([prefix, "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "convert_rec: error: %s.rec holds no usable image record (17 record(s) in its index: 17 damaged, first " \
           "record 0: no RecordIO magic at byte 0" % prefix in err and "Traceback" not in err, err
    after = folder_bytes(folder)
    assert {k: v for k, v in after.items() if k != "train.rec"} == {k: v for k, v in before.items() if k != "train.rec"}


def test_convert_cli_errors_are_one_line(insightface_set, tmp_path, capsys):
    prefix, _ = insightface_set
    rec_format.write_property(rec_format.property_path(prefix), 3, (112, 112))     # fewer classes than the labels
    missing = str(tmp_path / "none" / "train")
    for argv, message in (([missing], "source record file not found: %s.rec" % missing),
                          ([prefix], "%s.rec record 10 has class id 3 >= num_classes 3" % prefix)):
        assert convert_rec.main(argv + ["--workers", "1"]) == 1
        err = capsys.readouterr().err
        assert "convert_rec: error: " + message in err and "Traceback" not in err, err
    assert not os.path.exists(prefix + "_iter.rec")
    with open(rec_format.property_path(prefix), "wb") as f:
        f.write(bytes(range(128, 256)))
    assert convert_rec.main([prefix, "--workers", "1"]) == 1
    assert "convert_rec: error: %s: expected one line" % rec_format.property_path(prefix) in capsys.readouterr().err
    for argv in (["--workers", "0"], ["--image-size", "ab"]):
        with pytest.raises(SystemExit):
            convert_rec.main([prefix] + argv)
        assert "error: argument " + argv[0] in capsys.readouterr().err


def test_convert_cli(insightface_set):
    prefix, _ = insightface_set
    subprocess.run([sys.executable, "tools/convert_rec.py", prefix, "--workers", "1"], cwd=ROOT, check=True,
                   capture_output=True)
    assert record_reader.open_record_set(os.path.dirname(prefix))["num_images"] == 12
    with pytest.raises(FileNotFoundError, match="missing.rec"):
        convert_rec.convert(prefix + "missing", progress=False)


# ------------------------------------------------------------------------------------------------ identity index
def check_tool_index(iter_rec, caplog):
    """The index a tool wrote beside ``iter_rec`` equals a brute-force read of the file, and is taken as fresh."""
    index, stamp = identity_index.read(identity_index.index_file(iter_rec))
    assert {int(c): index.keys_of(c).tolist() for c in index.class_ids} == brute_force_index(iter_rec)
    assert stamp[-1] == len(index.keys) and index.left_out == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, "recognition.data"):
        identity_index.load(iter_rec, progress=False)
    assert caplog.text == ""                                            # not stale: used as written
    return index


def test_pack_writes_the_identity_index(image_dir, tmp_path, caplog):
    folder, _ = image_dir
    prefix = str(tmp_path / "train")
    pack_rec.pack(folder, prefix, workers=1, progress=False)
    index = check_tool_index(prefix + "_iter.rec", caplog)
    assert index.class_ids.tolist() == [0, 1, 2, 3] and index.counts.tolist() == [3, 1, 4, 2]
    pack_rec.pack(folder, str(tmp_path / "only" / "train"), layouts=("insightface",), workers=1, progress=False)
    assert sorted(os.listdir(str(tmp_path / "only"))) == ["property", "train.idx", "train.rec"]   # no _iter: no index


def test_convert_writes_the_identity_index(insightface_set, tmp_path, caplog):
    prefix, classes = insightface_set
    dst = str(tmp_path / "shuffled" / "train")
    convert_rec.convert(prefix, dst, shuffle=True, seed=3, workers=1, progress=False)   # classes out of key order
    index = check_tool_index(dst + "_iter.rec", caplog)
    assert index.counts.tolist() == [3, 2, 4, 3]
    assert not np.all(np.diff(index.keys.astype(np.int64)) > 0)         # keys come back grouped by identity


# ------------------------------------------------------------------------------------------------ layout helpers
def test_record_pack_and_parse_match_mxnet():
    for flag, label in ((0, 7.0), (2, [3.0, 9.0]), (4, rec_format.iter_label(2 ** 30 + 5, 17))):
        ours = rec_format.pack_record(flag, label, b"payload", 3)
        theirs = mx.recordio.pack(mx.recordio.IRHeader(flag, label, 3, 0), b"payload")
        assert ours == theirs
        got_flag, labels, payload = rec_format.unpack_record(ours)
        assert got_flag == flag and payload == b"payload"
    classes, keys = rec_format.decode_iter_labels(np.array([rec_format.iter_label(2 ** 30 + 5, 17)], np.float32))
    assert classes.tolist() == [2 ** 30 + 5] and keys.tolist() == [17]


def test_record_file_reads_multipart_records(tmp_path):
    """A payload holding the RecordIO magic word is split into parts by MXNet's writer; both readers agree."""
    magic = (rec_format.MAGIC).to_bytes(4, "little")
    payload = b"abcd" + magic + b"efgh" + magic + b"ij"
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "m.idx"), str(tmp_path / "m.rec"), "w")
    writer.write_idx(0, b"first")
    writer.write_idx(1, payload)
    writer.write_idx(2, b"last")
    writer.close()
    _, offsets = rec_format.read_index(str(tmp_path / "m.idx"))
    with rec_format.RecordFile(str(tmp_path / "m.rec")) as f:
        assert [f.read(o) for o in offsets] == [b"first", payload, b"last"]
        record, end = f.read_with_end(offsets[1])
        assert end == offsets[2]
        with pytest.raises(ValueError, match="magic"):
            f.read(offsets[1] + 4)


def test_property_errors_name_the_file(tmp_path):
    path = str(tmp_path / "property")
    with pytest.raises(FileNotFoundError, match="property"):
        rec_format.read_property(path)
    with open(path, "w") as f:
        f.write("ten,112,112\n")
    with pytest.raises(ValueError, match=path):
        rec_format.read_property(path)
    with open(path, "wb") as f:
        f.write(b"\x00\xff\xfe binary \x89")
    with pytest.raises(ValueError, match=re.escape(path + ": expected one line 'num_classes,height,width', found 12 "
                                                   "bytes of binary data")):
        rec_format.read_property(path)


def test_property_size_must_be_the_images_size(image_dir, tmp_path):
    """property saying 96x96 over 112x112 images is refused when the set is opened, naming both files."""
    folder, _ = image_dir
    prefix = str(tmp_path / "train")
    pack_rec.pack(folder, prefix, layouts=("iter",), workers=1, progress=False)
    assert record_reader.open_record_set(str(tmp_path))["image_size"] == (112, 112)
    rec_format.write_property(rec_format.property_path(prefix), 4, (96, 96))
    with pytest.raises(ValueError, match=re.escape("%s says 96x96 images, but the first image of %s_iter.rec does "
                                                   "not fit: image is 112x112, expected 96x96"
                                                   % (rec_format.property_path(prefix), prefix))):
        record_reader.open_record_set(str(tmp_path))
