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
