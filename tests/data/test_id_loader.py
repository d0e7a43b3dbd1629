"""FFC's id loader and its identity index: against a brute-force read of every record with MXNet's own reader."""
import collections
import logging
import os
import threading

import mxnet as mx
import numpy as np
import pytest

from recognition import config
from recognition.data import id_loader, identity_index, rec_format

SIZE = (24, 32)                     # height != width, so a transposed image is caught
BIG = 2 ** 24                       # float32 holds integers exactly only below this
# identity sizes (1: single-image identities), 13 identities, 40 images; class id of identity i = BIG + 7 * i
COUNTS = [3, 1, 4, 2, 5, 1, 3, 6, 2, 1, 4, 3, 5]


def key_image(key):
    """A PNG-exact image that names its record: R = key % 256, G = key // 256, B = 200 on the left half and 50
    on the right (a mirrored copy is told apart)."""
    img = np.empty(SIZE + (3,), np.uint8)
    img[..., 0], img[..., 1] = key % 256, key // 256
    img[:, :SIZE[1] // 2, 2], img[:, SIZE[1] // 2:, 2] = 200, 50
    return img


def write_set(folder, classes, payloads=None):
    """An images-only set whose record k has class ``classes[k]`` and image key_image(k); returns the .rec."""
    prefix = os.path.join(str(folder), "train")
    with rec_format.RecordSetWriter(prefix, None, SIZE, ("iter",)) as writer:
        for key, class_id in enumerate(classes):
            payload = payloads[key] if payloads else rec_format.encode_image(key_image(key), "png")
            writer.add(class_id, payload)
    return prefix + "_iter.rec"


def set_classes(seed=0):
    """Class of each record: identity i's images are spread over the file in a shuffled order."""
    classes = np.repeat(BIG + 7 * np.arange(len(COUNTS)), COUNTS)
    return np.random.default_rng(seed).permutation(classes).tolist()


def brute_force_index(rec_path):
    """{class id: sorted record keys} read record by record with mx.recordio (labels decoded in float64)."""
    reader = mx.recordio.MXIndexedRecordIO(rec_format.index_path(rec_path), rec_path, "r")
    found = collections.defaultdict(list)
    for key in reader.keys:
        header, _ = mx.recordio.unpack(reader.read_idx(key))
        lo, hi = np.asarray(header.label, np.float64)[:2]
        found[int(lo) + int(hi) * BIG].append(int(key))
    reader.close()
    return {c: sorted(keys) for c, keys in found.items()}


def as_dict(index):
    return {int(c): index.keys_of(c).tolist() for c in index.class_ids}


def row_keys(images, mirrored):
    """(keys, mirrored flags) of a batch's images read back from the pixels; every row must be key_image(key)
    or its mirror, exactly."""
    keys = (images[:, 0, 0, 0] + 256 * images[:, 1, 0, 0]).astype(np.int64)
    flips = []
    for row, key in enumerate(keys):
        ref = key_image(key).transpose(2, 0, 1).astype(np.float32)
        flips.append(not np.array_equal(images[row], ref))
        assert np.array_equal(images[row], ref[:, :, ::-1] if flips[-1] else ref), "row %d is not image %d" % (row,
                                                                                                              key)
    mirrored.extend(flips)
    return keys


def run_pass(loader, pass_index=0, start_step=0):
    """[(a, b, label, keys)] numpy copies of a pass."""
    return [(b.a.asnumpy(), b.b.asnumpy(), b.label, b.keys) for b in loader.batches(pass_index, start_step)]


def make(rec, batch_size, **kwargs):
    kwargs.setdefault("progress", False)
    return id_loader.IdentityLoader(rec, batch_size, image_size=SIZE, **kwargs)


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("ids"), set_classes())


# ------------------------------------------------------------------------------------------------ index
def test_index_matches_a_brute_force_scan_above_2_24(rec):
    index = identity_index.scan(rec, progress=False)
    expected = brute_force_index(rec)
    assert as_dict(index) == expected
    assert index.class_ids.dtype == np.int64 and index.class_ids[0] == BIG          # exact past float32's range
    assert index.counts.tolist() == COUNTS and index.left_out == 0
    assert index.keys.dtype == np.uint32                                             # compact on disk
    assert identity_index.group([5, 2, 5], [9, 4, 1]).keys.tolist() == [4, 1, 9]    # keys ascending per identity
    with pytest.raises(ValueError, match="negative"):
        identity_index.group([-1], [0])


def test_stable_order_matches_numpys_stable_argsort():
    rng = np.random.default_rng(1)
    for high in (5, 2 ** 16, 2 ** 19 + 3, 2 ** 33, 2 ** 50):
        values = rng.integers(0, high, 5000)
        assert np.array_equal(identity_index.stable_order(values), np.argsort(values, kind="stable"))
    mixed = np.array([3, -2, 3, 0, -2])
    assert identity_index.stable_order(mixed).tolist() == [1, 4, 3, 0, 2]
    assert identity_index.stable_order(np.zeros(0, np.int64)).size == 0


def test_index_is_written_beside_the_file_then_reused(rec, caplog):
    path = identity_index.index_file(rec)
    assert path.endswith("train_iter.ids.npz")
    if os.path.exists(path):
        os.remove(path)
    with caplog.at_level(logging.INFO, "recognition.data"):
        built = identity_index.load(rec, progress=False)
    assert "not found: building it" in caplog.text and os.path.isfile(path)
    caplog.clear()
    with caplog.at_level(logging.INFO, "recognition.data"):
        again = identity_index.load(rec, progress=False)
    assert caplog.text == ""                                                         # read, not rebuilt
    assert as_dict(again) == as_dict(built) == brute_force_index(rec)


def test_stale_or_broken_index_is_rebuilt_with_a_warning(tmp_path, caplog):
    rec = write_set(tmp_path, set_classes())
    path = identity_index.index_file(rec)
    identity_index.load(rec, progress=False)
    stat = os.stat(rec)
    os.utime(rec, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))                # the .rec "changed"
    with caplog.at_level(logging.WARNING, "recognition.data"):
        index = identity_index.load(rec, progress=False)
    assert "is stale (rec_mtime_ns of %s changed" % rec in caplog.text
    assert as_dict(index) == brute_force_index(rec)
    caplog.clear()
    identity_index.load(rec, progress=False)
    assert caplog.text == ""                                                         # the rebuilt one is fresh
    # an index made for another file of the same folder: its stamp (record count, sizes) does not match
    other = write_set(tmp_path / "other", set_classes()[:-1])
    identity_index.load(other, progress=False)
    with open(identity_index.index_file(other), "rb") as f:
        foreign = f.read()
    with open(path, "wb") as f:
        f.write(foreign)
    with caplog.at_level(logging.WARNING, "recognition.data"):
        index = identity_index.load(rec, progress=False)
    assert "num_records" in caplog.text and as_dict(index) == brute_force_index(rec)
    caplog.clear()
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not a zip")
    with caplog.at_level(logging.WARNING, "recognition.data"):
        index = identity_index.load(rec, progress=False)
    assert path in caplog.text and "rebuilding" in caplog.text and as_dict(index) == brute_force_index(rec)


def test_a_process_waits_for_another_ones_build(tmp_path, monkeypatch):
    """While another holds the build lock, load() waits, then reads the index written meanwhile: no second scan."""
    rec = write_set(tmp_path, set_classes())
    built = identity_index.scan(rec, progress=False)
    scans = []
    monkeypatch.setattr(identity_index, "scan", lambda *args, **kwargs: scans.append(1))
    results = []
    with identity_index._build_lock(rec):                      # "another process" building (a separate flock)
        waiter = threading.Thread(target=lambda: results.append(identity_index.load(rec, progress=False)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not results               # blocked on the lock
        identity_index.write(identity_index.index_file(rec), built,
                             identity_index.file_stamp(rec, len(built.keys)))
    waiter.join(30)
    assert not scans and as_dict(results[0]) == as_dict(built)


def test_unwritable_folder_keeps_the_index_in_memory(tmp_path, monkeypatch, caplog):
    rec = write_set(tmp_path, set_classes())

    def refuse(path, index, stamp):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(identity_index, "write", refuse)
    with caplog.at_level(logging.WARNING, "recognition.data"):
        index = identity_index.load(rec, progress=False)
    assert "stays in memory" in caplog.text and not os.path.exists(identity_index.index_file(rec))
    assert as_dict(index) == brute_force_index(rec)


def test_index_read_errors_name_the_file(tmp_path):
    path = str(tmp_path / "x.ids.npz")
    np.savez(open(path, "wb"), class_ids=np.array([3, 1]), starts=np.array([0, 1, 2]), keys=np.array([0, 1]),
             stamp=np.zeros(5, np.int64), left_out=np.int64(0), version=np.int64(1))
    with pytest.raises(ValueError, match="x.ids.npz is a damaged identity index"):      # class ids not ascending
        identity_index.read(path)
    np.savez(open(path, "wb"), class_ids=np.array([1]))
    with pytest.raises(ValueError, match="x.ids.npz is not an identity index: no keys"):
        identity_index.read(path)
    with pytest.raises(FileNotFoundError, match="missing_iter.rec"):
        identity_index.load(str(tmp_path / "missing_iter.rec"))


# ------------------------------------------------------------------------------------------------ loader
def test_rows_hold_two_different_images_of_their_identity(rec):
    expected = brute_force_index(rec)
    loader = make(rec, 3, decode_threads=2)
    assert loader.num_identities == 13 and loader.steps_per_pass == 4
    mirrored, seen_single = [], 0
    for pass_index in range(3):
        for a, b, label, keys in run_pass(loader, pass_index):
            assert a.shape == b.shape == (3, 3) + SIZE and a.dtype == np.float32 and label.dtype == np.int64
            keys_a, keys_b = row_keys(a, mirrored), row_keys(b, mirrored)
            assert np.array_equal(np.stack([keys_a, keys_b], 1), keys)
            for class_id, key_a, key_b in zip(label, keys_a, keys_b):
                own = expected[int(class_id)]
                assert key_a in own and key_b in own
                assert (key_a != key_b) == (len(own) > 1)             # the same image only when it is the only one
                seen_single += len(own) == 1
    loader.close()
    assert seen_single > 0 and 0.3 < np.mean(mirrored) < 0.7
    loader = make(rec, 3, rand_mirror=False)
    mirrored = []
    for a, b, _, _ in run_pass(loader):
        row_keys(a, mirrored), row_keys(b, mirrored)
    loader.close()
    assert not any(mirrored)


def test_image_pairs_are_drawn_uniformly(rec):
    """Every ordered pair of different images of an identity is drawn equally often (the draw alone, no
    decoding): identities of 1 to 6 images, one step of 13 identities per pass, 1200 passes."""
    loader = make(rec, 13)
    counts, passes = loader.index.counts, 1200
    pairs = collections.Counter()
    for pass_index in range(passes):
        ids, picks, _ = loader.step_plan(pass_index, 0)
        pairs.update(zip(ids.tolist(), picks[:, 0].tolist(), picks[:, 1].tolist()))
    loader.close()
    chi2, cells = 0.0, 0
    for ident, n in enumerate(counts):
        got = np.array([[pairs[ident, i, j] for j in range(n)] for i in range(n)], float)
        if n == 1:
            assert got[0, 0] == passes                                  # the only image, twice
            continue
        assert np.trace(got) == 0                                       # never the same image twice
        expected = passes / (n * (n - 1))
        off = got[~np.eye(n, dtype=bool)]
        assert off.min() > 0
        chi2, cells = chi2 + ((off - expected) ** 2 / expected).sum(), cells + off.size - 1
    assert chi2 < cells + 6 * np.sqrt(2 * cells), (chi2, cells)         # far in the tail of chi-square(cells)


def test_shards_are_disjoint_and_cover_each_pass(rec):
    loaders = [make(rec, 2, rank=r, num_ranks=3, decode_threads=1) for r in range(3)]
    assert [ld.steps_per_pass for ld in loaders] == [2, 2, 2]                    # 13 // 6, the same on every rank
    for pass_index in range(2):
        labels = [np.concatenate([lbl for _, _, lbl, _ in run_pass(ld, pass_index)]) for ld in loaders]
        taken = np.concatenate(labels)
        order = loaders[0].index.class_ids[loaders[0].order(pass_index)]
        assert len(set(taken.tolist())) == len(taken) == 12                      # each identity at most once
        assert sorted(taken.tolist()) == sorted(order[:12].tolist())            # the pass order's first 12
    orders = [loaders[0].order(p).tolist() for p in range(2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(13))
    for ld in loaders:
        ld.close()
    loader = make(rec, 13)                                                       # C = global batch: all of them
    (_, _, label, _), = run_pass(loader)
    assert sorted(label.tolist()) == (BIG + 7 * np.arange(13)).tolist()
    loader.close()


def test_same_batches_for_any_thread_count_prefetch_and_run(rec):
    runs = []
    for threads, prefetch in ((1, 0), (3, 2), (2, 1)):
        loader = make(rec, 2, rank=1, num_ranks=2, seed=7, decode_threads=threads, prefetch=prefetch)
        runs.append(run_pass(loader, 4))
        loader.close()
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 3
        for got, want in zip(run, runs[0]):
            assert all(np.array_equal(g, w) for g, w in zip(got, want))
    other = make(rec, 2, rank=1, num_ranks=2, seed=8)
    assert not np.array_equal(run_pass(other, 4)[0][3], runs[0][0][3])
    other.close()


def test_global_step_is_the_same_on_one_rank_or_two(rec):
    one = make(rec, 4)
    two = [make(rec, 2, rank=r, num_ranks=2) for r in range(2)]
    whole = run_pass(one, 1)
    halves = [run_pass(ld, 1) for ld in two]
    for step, batch in enumerate(whole):
        for field in range(4):
            assert np.array_equal(batch[field], np.concatenate([halves[0][step][field], halves[1][step][field]]))
    for ld in [one] + two:
        ld.close()


def test_resume_is_exact_and_decodes_nothing_before(rec):
    loader = make(rec, 3, rank=0, num_ranks=1)
    full = run_pass(loader, 2)
    decoded = []
    original = loader._decode_into

    def counting(out, row, entry, class_id, flip):
        decoded.append(entry)
        return original(out, row, entry, class_id, flip)
    loader._decode_into = counting
    tail = run_pass(loader, 2, start_step=3)
    assert len(tail) == 1 and len(decoded) == 2 * 3                             # one step: B rows, 2 images each
    for got, want in zip(tail, full[3:]):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert run_pass(loader, 2, start_step=4) == []
    with pytest.raises(ValueError, match="start_step 5 outside"):
        run_pass(loader, 2, start_step=5)
    loader.close()


def test_stopping_mid_pass_and_closing(rec):
    loader = make(rec, 2, prefetch=2)
    first = next(iter(loader.batches(0)))                    # abandoned after one step: the prefetched ones dropped
    again = run_pass(loader, 0)
    assert np.array_equal(first.a.asnumpy(), again[0][0])
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        run_pass(loader, 0)


def test_damaged_records_are_replaced_never_returned(tmp_path, caplog):
    """Identity 0 (3 images): one image undecodable. Identity 1 (1 image): undecodable, the identity is replaced.
    Identity 3 (2 images): one record's framing broken, left out of the index. Identity 2: one truncated image."""
    classes = np.repeat(np.arange(6), [3, 1, 4, 2, 3, 3]).tolist()
    payloads = [rec_format.encode_image(key_image(k), "png") for k in range(len(classes))]
    payloads[1] = b"\x89PNG\r\n\x1a\n" + bytes(len(payloads[1]) - 8)           # a PNG that does not decode
    payloads[3] = b"\xff\xd8\xff not a jpeg"
    payloads[5] = payloads[5][:len(payloads[5]) // 2]                           # cut short
    rec = write_set(tmp_path, classes, payloads)
    _, offsets = rec_format.read_index(rec_format.index_path(rec))
    with open(rec, "r+b") as f:                                                 # break record 8's RecordIO magic
        f.seek(int(offsets[8]))
        f.write(b"\0\0\0\0")
    undecodable = {1, 3, 5}
    with caplog.at_level(logging.WARNING, "recognition.data"):
        loader = make(rec, 2, decode_threads=2)
        assert loader.index.left_out == 1 and 8 not in loader.index.keys.tolist()
        assert "1 record(s) left out of the identity index" in caplog.text
        seen = collections.Counter()
        for pass_index in range(6):
            for a, b, label, keys in run_pass(loader, pass_index):
                mirrored = []
                assert np.array_equal(np.stack([row_keys(a, mirrored), row_keys(b, mirrored)], 1), keys)
                assert not undecodable & set(keys.ravel().tolist())
                for class_id, (key_a, key_b) in zip(label, keys):
                    assert classes[key_a] == classes[key_b] == class_id
                    assert key_a != key_b or class_id == 3                      # class 3 has one good image left
                    seen[int(class_id)] += 1
    assert loader.skipped > 0 and loader.replaced > 0 and 1 not in seen
    assert "skipped record" in caplog.text and rec in caplog.text
    assert "no image of class 1 in %s decodes; class" % rec in caplog.text
    loader.close()


def test_bad_input_errors_name_the_file(tmp_path, rec):
    with pytest.raises(FileNotFoundError, match="nothing_iter.rec"):
        id_loader.IdentityLoader(str(tmp_path / "nothing_iter.rec"), 2)
    with pytest.raises(ValueError, match="train_iter.rec has 13 identities, fewer than one global step takes "
                                         r"\(2 ranks x 7 identities\)"):
        make(rec, 7, num_ranks=2)
    with pytest.raises(ValueError, match=r"train_iter.rec key \d+: image is 24x32, expected 32x24"):
        id_loader.IdentityLoader(rec, 2, image_size=(32, 24), progress=False)
    index = identity_index.group([1, 2], [0, 999])
    with pytest.raises(ValueError, match="names key 999, which .*train_iter.idx does not have"):
        make(rec, 2, index=index)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        make(rec, 0)


def test_build_id_loader_from_the_config(rec):
    cfg = config.get_config("synthetic")
    cfg.data_dir, cfg.batch_size, cfg.preprocess_threads = os.path.dirname(rec), 2, 1
    rec_format.write_property(rec_format.property_path(rec[:-len("_iter.rec")]), BIG + 7 * 13, SIZE)
    loader = id_loader.build_id_loader(cfg, 1, 3)
    assert (loader.batch_size, loader.rank, loader.num_ranks, loader.seed) == (2, 1, 3, cfg.seed)
    assert loader.image_size == SIZE and loader.decode_threads == 1 and loader.steps_per_pass == 2
    loader.close()
    cfg.data_dir = None
    with pytest.raises(ValueError, match="--data-dir"):
        id_loader.build_id_loader(cfg, 0, 1)
