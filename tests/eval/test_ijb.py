"""eval/ijb.py against plain NumPy re-computations of every step (image features, media / template pooling, pair
scores, ROC and TAR table), the whole CLI on a synthetic IJB set written by tools/make_synthetic_ijb.py, its
errors, and that tool's landmarks. (Meta files and alignment: tests/eval/test_ijb_data.py.)"""
import json
import os

import cv2
import numpy as np
import pytest

from eval import ijb, ijb_data
from tests.eval.linear_models import linear_weights, save_linear_checkpoint, save_linear_onnx
from tests.eval.test_ijb_data import GOOD_FACES, GOOD_MARKS, GOOD_PAIRS, lstsq_similarity, write_meta
from tools import make_synthetic_ijb


# ------------------------------------------------------------------------------------------ references
def pooled_reference(features, templates, medias):
    """{template: unit feature}: per template, the mean of each media's features, summed, normalised."""
    out = {}
    for template in sorted(set(templates)):
        total = 0
        for media in sorted(set(m for t, m in zip(templates, medias) if t == template)):
            rows = [f for f, t, m in zip(features, templates, medias) if t == template and m == media]
            total = total + np.mean(rows, axis=0)
        norm = np.linalg.norm(total)
        out[template] = total / norm if norm > 0 else total
    return out


def roc_reference(labels, scores):
    """InsightFace's table from a hand-written ROC: one point per distinct threshold (accept: score >= t),
    points inside a straight run dropped as sklearn's roc_curve drops them, the origin added; each TAR is the
    TPR at the point nearest in FPR, the last such point on a tie. The AUC by counting (ties count one half)."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    counts = [(np.sum(impostor >= t), np.sum(genuine >= t)) for t in sorted(set(scores.tolist()), reverse=True)]
    kept = [counts[0]]
    for before, point, after in zip(counts, counts[1:], counts[2:]):
        if (point[0] - before[0], point[1] - before[1]) != (after[0] - point[0], after[1] - point[1]):
            kept.append(point)
    kept = [(0, 0)] + kept + ([counts[-1]] if len(counts) > 1 else [])
    fpr = [f / len(impostor) for f, _ in kept]
    tpr = [t / len(genuine) for _, t in kept]
    table = {}
    for key, far in ijb.FAR_LEVELS:
        best = min(range(len(fpr)), key=lambda i: (abs(fpr[i] - far), -i))
        table[key] = tpr[best]
    wins = (genuine[:, None] > impostor[None, :]) + 0.5 * (genuine[:, None] == impostor[None, :])
    return table, float(wins.mean())


# ------------------------------------------------------------------------------------ features, pooling
@pytest.mark.parametrize("norm_score, detector_score", [(True, True), (False, True), (True, False), (False, False)])
def test_image_features_follow_the_flags(norm_score, detector_score):
    rng = np.random.default_rng(2)
    embeddings, scores = rng.normal(size=(6, 5)).astype(np.float32), rng.uniform(0.3, 1, 6)
    expected = embeddings.astype(np.float64)
    if not norm_score:
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    if detector_score:
        expected = expected * scores[:, None]
    got = ijb.image_features(embeddings, scores, norm_score, detector_score)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_pooling_and_pair_scores_match_loops():
    rng = np.random.default_rng(3)
    templates = rng.choice([4, 9, 17, 30, 31], 40)
    medias = rng.choice([1, 2, 3, 50], 40)                       # media ids shared between templates, too
    features = rng.normal(size=(40, 6)).astype(np.float32)
    features[templates == 31] = 0                                # every image of template 31 unreadable
    ids, pooled = ijb.template_features(features, templates, medias)
    reference = pooled_reference(features.astype(np.float64), templates.tolist(), medias.tolist())
    assert ids.tolist() == sorted(reference)
    for template, row in zip(ids, pooled):
        np.testing.assert_allclose(row, reference[template], atol=1e-6)
    pairs = np.array([[4, 9], [30, 4], [17, 17], [31, 9], [9, 30]])
    scores = ijb.pair_scores(ids, pooled, pairs)
    expected = [reference[a] @ reference[b] for a, b in pairs]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert scores[3] == 0 and scores[2] == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("block", [1 << 24, 200 * 16])
def test_pair_scores_gathered_or_from_gram_blocks_match_a_loop(monkeypatch, block):
    """200 templates: 300 pairs are few enough to gather their rows, 20000 take the Gram-block product; with a
    small block (16 first templates at a time) the 20000 mix the two ways: the block of the first template that
    holds nearly all pairs is a product, the others gather."""
    monkeypatch.setattr(ijb, "_GRAM_BLOCK", block)
    rng = np.random.default_rng(4)
    ids = np.sort(rng.choice(10 ** 6, 200, replace=False))
    feats = rng.normal(size=(200, 12)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    for count in (300, 20000):
        rows = rng.integers(0, 200, (count, 2))
        if count > 300:
            rows[rng.random(count) < 0.995, 0] = 7          # one dense first template, the others sparse
        scores = ijb.pair_scores(ids, feats, ids[rows])
        expected = [feats[a].astype(np.float64) @ feats[b] for a, b in rows]
        np.testing.assert_allclose(scores, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ ROC
@pytest.mark.parametrize("seed, rounding", [(0, None), (1, 2), (2, 1)])
def test_tar_table_and_auc_match_the_reference(seed, rounding):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(60, int), np.zeros(1500, int)]
    scores = np.r_[rng.normal(0.6, 0.2, 60), rng.normal(0.0, 0.2, 1500)]
    if rounding is not None:
        scores = np.round(scores, rounding)                      # many ties: vertical, horizontal, diagonal runs
    order = rng.permutation(len(labels))
    labels, scores = labels[order], scores[order]
    fpr, tpr, auc, table = ijb.roc_table(labels, scores)
    expected, expected_auc = roc_reference(labels, scores)
    assert table == pytest.approx(expected, abs=1e-12)
    assert auc == pytest.approx(expected_auc, abs=1e-12)
    assert len(set(table.values())) > 2                           # the levels are told apart


def test_tar_table_hand_computed_case():
    """4 genuine, 10 impostor pairs. The ROC points (FPR, TPR): (0, 0), (0, .25), (0, .5), (.1, .5), (.1, .75),
    (.2, .75), (.2, 1), (1, 1). FAR 0.1 sits on two points: the larger TPR (0.75) counts; 1e-6 .. 1e-2 are
    nearest to FPR 0, whose largest TPR is 0.5."""
    labels = [1, 1, 1, 1] + [0] * 10
    scores = [0.9, 0.8, 0.6, 0.4, 0.7, 0.5] + [0.1] * 8
    _, _, auc, table = ijb.roc_table(labels, scores)
    assert table == {"1e-06": 0.5, "1e-05": 0.5, "1e-04": 0.5, "0.001": 0.5, "0.01": 0.5, "0.1": 0.75}
    assert auc == pytest.approx((4 * 10 - 1 - 2) / 40)            # 0.6 and 0.4 lose to 0.7, 0.4 to 0.5


# ------------------------------------------------------------------------------------- the whole CLI
def reference_result(root, weight, bias, flip, norm_score, detector_score):
    """The protocol re-computed plainly from the files: per image lstsq alignment, warp, NumPy network,
    per-view normalisation, flags, pooling by loops, cosine scores, the reference ROC table."""
    with open(os.path.join(root, "meta", "ijbc_face_tid_mid.txt")) as f:
        faces = [line.split() for line in f if line.strip()]
    with open(os.path.join(root, "meta", "ijbc_name_5pts_score.txt")) as f:
        marks = {line.split()[0]: np.array(line.split()[1:], float) for line in f if line.strip()}
    with open(os.path.join(root, "meta", "ijbc_template_pair_label.txt")) as f:
        pairs = np.array([line.split() for line in f if line.strip()], int)
    features = []
    for name, _, _ in faces:
        image = cv2.imread(os.path.join(root, "loose_crop", name))
        if image is None:
            features.append(np.zeros(len(bias)))
            continue
        matrix = lstsq_similarity(marks[name][:10].reshape(5, 2))
        rgb = cv2.warpAffine(image, matrix, (112, 112), borderValue=0)[:, :, ::-1].transpose(2, 0, 1)
        views = [rgb, rgb[:, :, ::-1]] if flip else [rgb]
        raw = [weight @ v.astype(np.float64).ravel() + bias for v in views]
        feature = sum(r / np.linalg.norm(r) for r in raw)
        if not norm_score:
            feature = feature / np.linalg.norm(feature)
        features.append(feature * (marks[name][10] if detector_score else 1.0))
    pooled = pooled_reference(np.array(features), [int(t) for _, t, _ in faces], [int(m) for _, _, m in faces])
    scores = np.array([pooled[a] @ pooled[b] for a, b, _ in pairs])
    table, auc = roc_reference(pairs[:, 2], scores)
    return scores, table, auc, len(pooled)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ijb"))
    summary = make_synthetic_ijb.make_ijb(root, first_identity=50, identities=5, templates=2, media=2, frames=2,
                                          video=0.5, low_quality=0.3, workers=1, progress=False)
    with open(os.path.join(root, "loose_crop", "3.jpg"), "r+b") as f:
        f.truncate(30)                                            # an unreadable image
    prefix = os.path.join(root, "model")
    weight, bias = linear_weights((3, 112, 112))
    save_linear_checkpoint(prefix, weight, bias)
    return root, prefix, weight.astype(np.float64), bias.astype(np.float64), summary


@pytest.mark.parametrize("backend, flags", [("mxnet", []), ("mxnet", ["--no-flip", "--no-norm-score",
                                                                     "--no-detector-score"]), ("onnx", [])])
def test_cli_matches_the_numpy_recomputation(synthetic_set, tmp_path, capsys, backend, flags):
    root, prefix, weight, bias, summary = synthetic_set
    model = ["--model", prefix + ",1"]
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("eval.onnx_backend")
        model = ["--onnx", str(tmp_path / "linear.onnx")]
        save_linear_onnx(model[1], weight.astype(np.float32), bias.astype(np.float32), (3, 112, 112))
    out = str(tmp_path / "result")
    argv = model + ["--data-dir", root, "--target", "ijbc", "--batch-size", "5", "--result-dir", out, "--workers",
                    "2", "--json"] + flags
    assert ijb.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    scores, table, auc, templates = reference_result(root, weight, bias, flip="--no-flip" not in flags,
                                                     norm_score="--no-norm-score" not in flags,
                                                     detector_score="--no-detector-score" not in flags)
    assert report["target"] == "IJBC" and report["model"] == model[1]
    assert report["num_images"] == summary["images"] and report["num_unreadable"] == 1
    assert report["num_templates"] == templates == summary["templates"]
    assert report["num_pairs"] == len(scores) == summary["genuine_pairs"] + summary["impostor_pairs"]
    saved = np.load(os.path.join(out, "ijbc_scores.npy"))
    np.testing.assert_allclose(saved, scores, atol=2e-5)
    assert list(report["tar_at_far"]) == ["1e-06", "1e-05", "1e-04", "0.001", "0.01", "0.1"]
    assert report["tar_at_far"] == pytest.approx(table, abs=1e-12)
    assert report["auc"] == pytest.approx(auc, abs=1e-12)
    assert "1 of %d images could not be read" % summary["images"] in captured.err and "3.jpg" in captured.err
    assert "TAR (%)" in captured.err                              # the table, on stderr with --json
    with open(os.path.join(out, "ijbc_roc.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "ijbc_result.json")) as f:
        assert json.load(f) == report


def test_cli_errors(synthetic_set, tmp_path, capsys):
    root, prefix, _, _, _ = synthetic_set
    base = ["--data-dir", root, "--target", "IJBC", "--result-dir", str(tmp_path / "r")]
    assert ijb.main(base[:3] + ["IJBB"] + base[4:] + ["--model", prefix + ",1"]) == 1
    assert "meta/ijbb_face_tid_mid.txt" in capsys.readouterr().err
    assert ijb.main(base + ["--model", prefix + ",2"]) == 1
    assert "model-0002.params" in capsys.readouterr().err
    assert ijb.main(base + ["--onnx", str(tmp_path / "none.onnx")]) == 1
    assert "none.onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ijb.main(base + ["--model", prefix + ",1", "--onnx", "x.onnx"])
    empty = write_meta(tmp_path / "empty", GOOD_FACES, GOOD_MARKS, GOOD_PAIRS)
    assert ijb.main(["--data-dir", empty, "--target", "IJBC", "--model", prefix + ",1"]) == 1
    assert "IJB image folder not found: %s" % os.path.join(empty, "loose_crop") in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
    # damaged model files and an unusable result folder: one line naming the file, before any image is read
    broken = str(tmp_path / "broken")
    with open(prefix + "-symbol.json") as f, open(broken + "-symbol.json", "w") as out:
        out.write(f.read())
    with open(prefix + "-0001.params", "rb") as f, open(broken + "-0001.params", "wb") as out:
        out.write(f.read()[:-100])                                 # truncated
    (tmp_path / "file").write_text("")
    for argv, message in [(["--model", broken + ",1"], broken + "-0001.params is not a readable MXNet parameter"),
                          (["--model", prefix + ",1", "--result-dir", str(tmp_path / "file" / "r")],
                           "--result-dir %s: %s is a file" % (tmp_path / "file" / "r", tmp_path / "file"))]:
        assert ijb.main(base + argv) == 1
        err = capsys.readouterr().err
        assert "ijb: error: " + message in err and "Traceback" not in err and err.count("ijb: error") == 1, err
    with pytest.raises(SystemExit):
        ijb.main(base + ["--model", prefix + ",1", "--workers", "0"])
    assert "argument --workers: must be >= 1, got 0" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- the synthetic tool
def test_synthetic_landmarks_align_back_to_the_drawn_view(tmp_path):
    root = str(tmp_path)
    make_synthetic_ijb.make_ijb(root, first_identity=7, identities=2, templates=2, media=1, frames=1,
                                landmark_noise=0.0, low_quality=0.0, workers=1, progress=False)
    meta = ijb_data.read_meta(root, "IJBC")
    faces, ok = ijb_data.load_aligned([os.path.join(root, "loose_crop", n) for n in meta.names],
                                      ijb_data.similarity_matrices(meta.landmarks))
    assert ok.all() and len(faces) == 4
    views = [make_synthetic_ijb.media_view(0, identity, template, 0).transpose(2, 0, 1).astype(float)
             for identity in (7, 8) for template in (0, 1)]
    inner = (slice(None), slice(8, -8), slice(8, -8))            # the frame border may show at the edges
    for face, view, other in zip(faces, views, views[1:] + views[:1]):
        own, foreign = (np.abs(face.astype(float) - v)[inner].mean() for v in (view, other))
        # the view's own pixel noise (sigma 5), JPEG and two resamplings leave ~5 grey levels; another face ~30+
        assert own < 8 and 4 * own < foreign
    assert meta.templates.tolist() == [1, 2, 3, 4]
    assert meta.detector_scores.min() >= 0.8                     # no low-quality image asked for
    assert sorted(map(tuple, np.c_[meta.pairs, meta.labels].tolist())) == \
        [(1, 2, 1), (1, 3, 0), (1, 4, 0), (2, 3, 0), (2, 4, 0), (3, 4, 1)]


def test_synthetic_set_does_not_depend_on_workers(tmp_path):
    contents = []
    for workers in (1, 2):
        root = str(tmp_path / ("w%d" % workers))
        make_synthetic_ijb.make_ijb(root, first_identity=3, identities=3, templates=2, media=2, frames=3,
                                    video=0.5, impostors=5, workers=workers, progress=False)
        files = [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names]
        contents.append({os.path.relpath(path, root): open(path, "rb").read() for path in files})
    assert contents[0] == contents[1] and len(contents[0]) > 8
    with open(os.path.join(tmp_path, "w1", "meta", "ijbc_template_pair_label.txt")) as f:
        labels = [line.split()[2] for line in f]
    assert labels.count("1") == 3 and labels.count("0") == 5      # every genuine pair, 5 of the impostors
    with pytest.raises(ValueError, match=">= 2 templates each"):
        make_synthetic_ijb.make_ijb(str(tmp_path / "bad"), first_identity=0, identities=3, templates=1)
