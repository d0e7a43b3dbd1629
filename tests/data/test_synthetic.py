"""tools/make_synthetic.py: deterministic, learnable synthetic identities and a balanced holdout .bin."""
import os
import pickle

import cv2
import numpy as np
import pytest

from recognition.data import record_reader
from tools import make_synthetic

AUG = make_synthetic.DEFAULT_AUG


def pixels(jpegs, side=16):
    """Downsampled RGB pixels (float vectors) of JPEG bytes: the features of the pixel-level baselines."""
    return np.stack([cv2.resize(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), (side, side),
                                interpolation=cv2.INTER_AREA).astype(np.float32).ravel() for j in jpegs])


def best_threshold_accuracy(distances, same):
    """Accuracy of the best 'same if distance < t' rule (the verification baseline)."""
    distances, same = np.asarray(distances), np.asarray(same, bool)
    return max(np.mean((distances < t) == same) for t in np.append(distances, np.inf))


def test_views_are_deterministic_and_distinct():
    a = make_synthetic.identity_views(3, 2, seed=0, aug=AUG)
    assert a == make_synthetic.identity_views(3, 2, seed=0, aug=AUG)
    assert make_synthetic.identity_views(3, 1, seed=0, aug=AUG, first_view=1) == a[1:]
    assert a[0] != a[1]                                                  # two views of one identity differ
    assert a[0] != make_synthetic.identity_views(3, 1, seed=1, aug=AUG)[0]
    image = cv2.imdecode(np.frombuffer(a[0], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (112, 112, 3) and image.std() > 20


def test_nearest_class_centroid_on_pixels_beats_chance_widely():
    """Held-out views of training identities: a nearest-centroid rule on 16x16 pixels is far above chance."""
    n, train, test = 30, 6, 4
    feats = [pixels(make_synthetic.identity_views(i, train + test, seed=0, aug=AUG)) for i in range(n)]
    centroids = np.stack([f[:train].mean(0) for f in feats])
    queries = np.concatenate([f[train:] for f in feats])
    truth = np.repeat(np.arange(n), test)
    predicted = ((queries[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == truth).mean()
    assert accuracy > 0.6, accuracy                                       # chance: 1/30
    # the augmentation knobs matter: three times the default strength makes the same rule do worse
    hard = {k: v * 3 for k, v in AUG.items()}
    feats = [pixels(make_synthetic.identity_views(i, train + test, seed=0, aug=hard)) for i in range(n)]
    centroids = np.stack([f[:train].mean(0) for f in feats])
    queries = np.concatenate([f[train:] for f in feats])
    hard_accuracy = (((queries[:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == truth).mean()
    assert hard_accuracy < accuracy


def test_make_pairs_is_balanced():
    pairs = make_synthetic.make_pairs(10, 4, 200, seed=0)
    same = [p[4] for p in pairs]
    assert len(pairs) == 200 and sum(same) == 100
    for a, va, b, vb, is_same in pairs:
        assert (a == b) == is_same and (va != vb if is_same else True)
        assert 0 <= a < 10 and 0 <= b < 10 and 0 <= va < 4 and 0 <= vb < 4
    assert same[:10] != [True, False] * 5                                 # shuffled, not alternating
    with pytest.raises(ValueError, match="even"):
        make_synthetic.make_pairs(10, 4, 7, seed=0)


def test_make_dataset_writes_training_set_and_holdout_bin(tmp_path):
    out = str(tmp_path / "syn")
    summary = make_synthetic.make_dataset(out, identities=6, images=3, holdout=20, pairs=200, holdout_images=4,
                                          workers=2, progress=False)
    assert summary == {"train_images": 18, "identities": 6, "holdout_identities": 20, "pairs": 200}
    for name in ("train.rec", "train.idx", "train_iter.rec", "train_iter.idx", "property", "holdout.bin"):
        assert os.path.isfile(os.path.join(out, name)), name
    found = record_reader.open_record_set(out)
    assert (found["num_classes"], found["num_images"]) == (6, 18)
    reader = record_reader.RecordReader(found["rec"], 3, 6, shuffle=False, rand_mirror=False)
    labels = np.concatenate([b.label for b in reader.epoch(0)])
    assert labels.tolist() == [c for c in range(6) for _ in range(3)]
    with open(os.path.join(out, "holdout.bin"), "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    assert len(bins) == 400 and len(issame) == 200 and sum(issame) == 100
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in bins)
    train_views = {j for i in range(6) for j in make_synthetic.identity_views(i, 3, 0, AUG)}
    assert not train_views & set(bins)                                    # held-out identities are new ones
    # the pairs are separable on raw pixels well above chance (a trained network does much better)
    feats = pixels(bins)
    distances = ((feats[0::2] - feats[1::2]) ** 2).sum(1)
    assert best_threshold_accuracy(distances, issame) > 0.75


def test_output_does_not_depend_on_workers(tmp_path):
    digests = []
    for workers in (1, 2):
        out = str(tmp_path / ("w%d" % workers))
        make_synthetic.make_dataset(out, identities=3, images=2, holdout=3, pairs=4, workers=workers,
                                    progress=False)
        digests.append([open(os.path.join(out, n), "rb").read() for n in ("train.rec", "train_iter.rec",
                                                                            "holdout.bin")])
    assert digests[0] == digests[1]


# --------------------------------------------------------------------------------- labels: the knobs
def read_records(folder):
    """[(label, JPEG bytes)] of train_iter.rec in record order, and the InsightFace layout's identity ranges
    {label: (first key, end key)} of train.rec."""
    from recognition.data import rec_format
    keys, offsets = rec_format.read_index(os.path.join(folder, "train_iter.idx"))
    records = []
    with rec_format.RecordFile(os.path.join(folder, "train_iter.rec")) as rec:
        for key, offset in zip(keys, offsets):
            flag, labels, payload = rec_format.unpack_record(rec.read(offset))
            records.append((rec_format.exact_class_id(flag, labels, "test"), payload))
    keys, offsets = rec_format.read_index(os.path.join(folder, "train.idx"))
    offset_of = dict(zip(keys.tolist(), offsets.tolist()))
    with rec_format.RecordFile(os.path.join(folder, "train.rec")) as rec:
        _, (first, end), _ = rec_format.unpack_record(rec.read(offset_of[0]))
        ranges = {}
        for label, key in enumerate(range(int(first), int(end))):
            _, (start, stop), _ = rec_format.unpack_record(rec.read(offset_of[key]))
            ranges[label] = (int(start), int(stop))
    return records, ranges


KNOBS = dict(identities=10, images=8, holdout=5, pairs=12, holdout_images=3, long_tail=0.8, min_images=2,
             conflicts=0.2, label_noise=0.1, spread=0.6)


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("noisy"))
    summary = make_synthetic.make_dataset(out, workers=2, progress=False, **KNOBS)
    return out, summary


def test_long_tail_conflicts_and_noise_are_exactly_what_was_asked(noisy_set):
    out, summary = noisy_set
    n, total_expected = 10, None
    counts = np.maximum(np.rint(8 * np.arange(1, n + 1) ** -0.8), 2).astype(int)      # 8, 5, 3, 3, 2, ...
    assert counts.tolist() == [8, 5, 3, 3, 2, 2, 2, 2, 2, 2]
    total_expected = counts.sum()
    truth = np.load(os.path.join(out, "labels.npz"))
    identity, view, label, noisy, second = (truth[k] for k in ("identity", "view", "label", "noisy", "second_label"))
    # the truth file describes the records: each record is the drawing of its (identity, view), under its label
    records, ranges = read_records(out)
    assert len(records) == total_expected == summary["train_images"]
    for (written_label, jpeg), i, v, lab in zip(records, identity, view, label):
        assert written_label == lab
        assert jpeg == make_synthetic.render_views(int(i), [int(v)], 0, AUG, spread=0.6)[0]
    assert np.bincount(identity).tolist() == counts.tolist()                              # the long tail
    assert sorted(zip(identity.tolist(), view.tolist())) == [(i, v) for i in range(n) for v in range(counts[i])]
    # conflicts: round(0.2 * 10) = 2 identities, second labels 10 and 11; the last half of their images moved
    conflicted = np.flatnonzero(second >= 0)
    assert len(conflicted) == 2 and sorted(second[conflicted].tolist()) == [10, 11]
    assert all(counts[i] >= 2 for i in conflicted)
    clean = ~noisy
    for i in range(n):
        own = {i} | ({int(second[i])} if second[i] >= 0 else set())
        mine = identity == i
        assert set(label[mine & clean].tolist()) <= own
        if second[i] >= 0:              # every image of the identity, noisy or not, by where it was planned
            moved = view[mine & clean] >= counts[i] - counts[i] // 2
            assert (label[mine & clean][moved] == second[i]).all() and (label[mine & clean][~moved] == i).all()
    # noise: round(0.1 * 31) = 3 images, each under a label of another identity
    assert noisy.sum() == round(0.1 * total_expected) == summary["noisy_images"] == 3
    for i, lab in zip(identity[noisy], label[noisy]):
        assert lab not in (i, second[i])
    # every label keeps an image of its own; the InsightFace layout groups each label's images in one key range
    for lab in range(12):
        assert (clean & (label == lab)).any()
        start, stop = ranges[lab]
        assert [records[k - 1][0] for k in range(start, stop)] == [lab] * (stop - start)
    with open(os.path.join(out, "property")) as f:
        assert f.read().split(",")[0] == "12"
    assert summary["labels"] == 12 and summary["conflicted"] == 2


def test_holdout_is_clean_and_of_unseen_identities(noisy_set):
    out, _ = noisy_set
    with open(os.path.join(out, "holdout.bin"), "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    held = {jpeg: i for i in range(10, 15) for jpeg in make_synthetic.identity_views(i, 3, 0, AUG, spread=0.6)}
    train = {jpeg for i in range(10) for jpeg in make_synthetic.identity_views(i, 8, 0, AUG, spread=0.6)}
    assert len(issame) == 12 and sum(issame) == 6
    for pair, same in enumerate(issame):
        a, b = held[bins[2 * pair]], held[bins[2 * pair + 1]]         # every image: a held-out identity's view
        assert (a == b) == same                                        # labels of the pairs are the truth
    assert not train & set(bins)


def test_knobbed_output_is_a_pure_function_of_the_arguments(noisy_set, tmp_path):
    out, _ = noisy_set
    again = str(tmp_path / "again")
    make_synthetic.make_dataset(again, workers=1, progress=False, **KNOBS)
    for name in ("train.rec", "train.idx", "train_iter.rec", "train_iter.idx", "holdout.bin", "labels.npz",
                 "property"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(again, name), "rb").read(), name
    other = make_synthetic.label_plan([3] * 10, seed=1, conflicts=0.2, label_noise=0.1)
    same = make_synthetic.label_plan([3] * 10, seed=1, conflicts=0.2, label_noise=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(other, same))
    moved = make_synthetic.label_plan([3] * 10, seed=2, conflicts=0.2, label_noise=0.1)
    assert not np.array_equal(other.label, moved.label)


def test_default_arguments_keep_todays_layout(tmp_path):
    """Without the knobs the set is what the tool always wrote: identity k's views 0..images-1 under label k,
    in identity order (the drawings themselves are identity_views, unchanged)."""
    out = str(tmp_path / "plain")
    make_synthetic.make_dataset(out, identities=4, images=3, holdout=0, workers=1, progress=False)
    records, _ = read_records(out)
    assert records == [(i, jpeg) for i in range(4) for jpeg in make_synthetic.identity_views(i, 3, 0, AUG)]
    truth = np.load(os.path.join(out, "labels.npz"))
    assert not truth["noisy"].any() and (truth["second_label"] == -1).all()


def test_spread_pulls_every_continuous_parameter_to_the_middle_of_its_range():
    full, half = make_synthetic.identity_params(0, 7), make_synthetic.identity_params(0, 7, spread=0.5)
    assert half["hair_style"] == full["hair_style"] and half["extra"] == full["extra"]
    for key, low, high in (("face_w", 30, 42), ("eye_y", 46, 56), ("mouth_curve", -4, 6)):
        middle = (low + high) / 2
        assert half[key] == pytest.approx(middle + 0.5 * (full[key] - middle))
    for got, was in zip(half["background"], full["background"]):
        assert got == pytest.approx(127.5 + 0.5 * (was - 127.5))
    # identities drawn with a small spread are closer to each other on pixels
    def mean_distance(spread):
        feats = np.stack([pixels(make_synthetic.identity_views(i, 1, 0, AUG, spread=spread))[0] for i in range(12)])
        return np.mean([np.linalg.norm(a - b) for k, a in enumerate(feats) for b in feats[k + 1:]])
    assert mean_distance(0.3) < 0.7 * mean_distance(1.0)


@pytest.mark.parametrize("argv, message", [
    (["--holdout", "1"], "holdout pairs need >= 2 identities"),
    (["--pairs", "3"], "--pairs must be a positive even number"),
    (["--conflicts", "1.5"], "--conflicts must be a fraction"),
    (["--identities", "4", "--images", "1", "--conflicts", "0.5", "--holdout", "0"], "only 0 have >= 2 images"),
    (["--identities", "2", "--images", "2", "--label-noise", "0.9", "--holdout", "0"], "--label-noise 0.9"),
    (["--spread", "0"], "--spread must be in (0, 1]"),
    (["--long-tail", "1", "--min-images", "30"], "--min-images must be in 1..--images"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--noise", "-2"], "--noise must be >= 0"),
    (["--workers", "0"], "--workers >= 1"),
])
def test_bad_arguments_are_one_clear_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        make_synthetic.main([str(tmp_path / "never")] + argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "never")
