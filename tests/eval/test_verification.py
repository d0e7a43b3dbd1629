"""eval/verification.py: the metrics against hand-computed answers and a plain NumPy reference, the flip-summed
batched embedding, verify() and the CLI (the .bin container: test_bin_files.py)."""
import json

import mxnet as mx
import numpy as np
import pytest
from sklearn.model_selection import KFold

from eval import verification as ver
from eval.embedding import Embedder
from tests.eval.test_bin_files import encode, random_faces


# ------------------------------------------------------------------------------------------- helpers
def pairs_at_distances(distances, rng, dim=3):
    """Raw embeddings (2P, dim) whose pairs have the given squared distances after L2 normalisation; every
    embedding has a random norm (evaluate must normalise) and direction."""
    embeddings = []
    for d in distances:
        basis, _ = np.linalg.qr(rng.normal(size=(dim, 2)))        # two orthonormal random directions
        angle = np.arccos(1.0 - d / 2.0)                           # |u - v|^2 = 2 - 2 cos(angle)
        first, second = basis[:, 0], np.cos(angle) * basis[:, 0] + np.sin(angle) * basis[:, 1]
        embeddings += [first * rng.uniform(0.5, 30), second * rng.uniform(0.5, 30)]
    return np.array(embeddings)


def reference_metrics(embeddings, issame, nfolds=10, far_target=1e-3):
    """The protocol written out plainly: sklearn KFold, a loop over thresholds, brute-force interpolation."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = ((unit[0::2] - unit[1::2]) ** 2).sum(1)
    accuracies, vals, best_thresholds = [], [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(dist):
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in np.arange(0, 4, 0.01)]
        best = np.arange(0, 4, 0.01)[int(np.argmax(train_acc))]
        best_thresholds.append(best)
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
        thresholds = np.arange(0, 4, 0.001)
        far = np.array([np.sum((dist[train] < t) & ~issame[train]) / np.sum(~issame[train]) for t in thresholds])
        threshold = 0.0
        for j in range(len(thresholds) - 1):
            if far[j] <= far_target < far[j + 1]:
                threshold = thresholds[j] + (far_target - far[j]) / (far[j + 1] - far[j]) * 0.001
        vals.append(np.sum((dist[test] < threshold) & issame[test]) / np.sum(issame[test]))
    same, diff = dist[issame], dist[~issame]
    auc = np.mean((same[:, None] < diff[None, :]) + 0.5 * (same[:, None] == diff[None, :]))
    return {"accuracy": np.mean(accuracies), "accuracy_std": np.std(accuracies), "val": np.mean(vals),
            "val_std": np.std(vals), "auc": auc, "threshold": np.mean(best_thresholds),
            "xnorm": np.linalg.norm(embeddings, axis=1).mean()}


def tiny_model(image_size=(6, 5), dim=4, seed=0, head=False):
    """data -> Flatten -> FullyConnected 'fc1' (optionally with a classifier and loss on top, as in training):
    (symbol, arg_params, aux_params, W, b)."""
    rng = np.random.default_rng(seed)
    data = mx.sym.Variable("data")
    symbol = mx.sym.FullyConnected(mx.sym.Flatten(data), num_hidden=dim, name="fc1")
    if head:
        symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(symbol, num_hidden=3, name="fc7"), name="softmax")
    weight = rng.normal(size=(dim, 3 * image_size[0] * image_size[1])).astype(np.float32) / 50
    bias = rng.normal(size=dim).astype(np.float32)
    args = {"fc1_weight": mx.nd.array(weight), "fc1_bias": mx.nd.array(bias)}
    if head:
        args.update(fc7_weight=mx.nd.ones((3, dim)), fc7_bias=mx.nd.zeros(3))
    return symbol, args, {}, weight, bias


def numpy_embed(images, weight, bias):
    """f(x) + f(x flipped along the width) with f = the tiny FC, in float64."""
    x = images.astype(np.float64)
    return (x.reshape(len(x), -1) @ weight.T.astype(np.float64) + bias
            + x[..., ::-1].reshape(len(x), -1) @ weight.T.astype(np.float64) + bias)


# ------------------------------------------------------------------------------------------- metrics
def test_perfectly_separable_pairs_score_one():
    """Every fold holds the same spread of distances (same pairs 0.1..0.9, different 1.6..3.5, off the
    threshold grid), so the threshold learnt on 9 folds separates the 10th too."""
    rng = np.random.default_rng(0)
    block = np.r_[np.linspace(0.1, 0.9, 10), np.linspace(1.6, 3.5, 10)] + 0.0005
    order = np.concatenate([rng.permutation(20) + 20 * fold for fold in range(10)])
    distances, issame = np.tile(block, 10)[order], np.tile(np.arange(20) < 10, 10)[order]
    metrics = ver.evaluate(pairs_at_distances(distances, rng), issame)
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_std"] == 0.0
    assert metrics["val"] == 1.0 and metrics["auc"] == 1.0 and metrics["far"] == 0.0
    assert sorted(metrics) == ["accuracy", "accuracy_std", "auc", "far", "threshold", "val", "val_std", "xnorm"]
    assert all(type(v) is float for v in metrics.values())           # JSON-ready


def test_known_overlap_gives_the_hand_computed_answer():
    """10 folds of 200 pairs, alike: 50 same pairs at distance 0.5, 50 at 1.2; 99 different at 2.0 and one
    at 1.0005. Accuracy: on 9 training folds the best threshold is the first above 1.2 (1.21: 9 errors, against
    450 for any threshold in (0.5, 1.0005]); it accepts the held-out fold's one close different pair: 199/200.
    VAL: the training FAR is 0 up to threshold 1.000 and 9/900 from 1.001, so FAR=1e-3 interpolates to 1.0001,
    which accepts the 0.5 same pairs only: VAL 0.5, FAR 0.
    AUC: P(d_same < d_diff) = 0.5 * 1 + 0.5 * 0.99."""
    block_d = [0.5] * 50 + [1.2] * 50 + [2.0] * 99 + [1.0005]
    block_same = [True] * 100 + [False] * 100
    rng = np.random.default_rng(3)
    embeddings = pairs_at_distances(np.tile(block_d, 10), rng)
    metrics = ver.evaluate(embeddings, np.tile(block_same, 10))
    assert metrics["accuracy"] == pytest.approx(0.995, abs=1e-12)
    assert metrics["accuracy_std"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["threshold"] == pytest.approx(1.21, abs=1e-9)
    assert metrics["val"] == 0.5 and metrics["val_std"] == 0.0 and metrics["far"] == 0.0
    assert metrics["auc"] == pytest.approx(0.995, abs=1e-12)
    assert metrics["xnorm"] == pytest.approx(np.linalg.norm(embeddings, axis=1).mean(), rel=1e-12)


def test_val_interpolation_moves_with_the_far_target():
    """The same data at FAR = 0.005: the threshold interpolates to 1.0005 - a hair, still below the close
    different pair; at FAR = 0.02 (beyond the 0.01 reached at 1.001) the threshold passes 1.2: VAL 1, FAR 0.01."""
    block_d = [0.5] * 50 + [1.2] * 50 + [2.0] * 99 + [1.0005]
    issame = np.tile([True] * 100 + [False] * 100, 10)
    embeddings = pairs_at_distances(np.tile(block_d, 10), np.random.default_rng(4))
    assert ver.evaluate(embeddings, issame, far_target=0.005)["val"] == 0.5
    wide = ver.evaluate(embeddings, issame, far_target=0.02)
    assert wide["val"] == 1.0 and wide["far"] == pytest.approx(0.01, abs=1e-12)


@pytest.mark.parametrize("pairs, nfolds", [(600, 10), (347, 10), (90, 5)])
def test_metrics_match_the_plain_numpy_reference(pairs, nfolds):
    """Overlapping random classes, fold sizes equal and unequal (347 pairs: KFold's 35/34 split)."""
    rng = np.random.default_rng(pairs)
    issame = rng.random(pairs) < 0.5
    distances = np.clip(np.where(issame, rng.normal(1.0, 0.35, pairs), rng.normal(1.7, 0.3, pairs)), 0.01, 3.9)
    embeddings = pairs_at_distances(distances, rng, dim=8)
    got, expected = ver.evaluate(embeddings, issame, nfolds=nfolds), reference_metrics(embeddings, issame, nfolds)
    assert 0.6 < got["accuracy"] < 0.99 and 0 < got["val"] < 1         # a case where the folds disagree
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_evaluate_rejects_bad_input():
    embeddings = pairs_at_distances([0.5, 1.5] * 10, np.random.default_rng(0))
    issame = np.array([True, False] * 10)
    with pytest.raises(ValueError, match="2 embeddings per pair"):
        ver.evaluate(embeddings[:-1], issame)
    with pytest.raises(ValueError, match="both same and different"):
        ver.evaluate(embeddings, np.ones(20, bool))
    zero = embeddings.copy()
    zero[7] = 0
    with pytest.raises(ValueError, match="embedding 7 is all zeros"):
        ver.evaluate(zero, issame)
    with pytest.raises(ValueError, match="nfolds"):
        ver.evaluate(embeddings, issame, nfolds=21)


# ------------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("count, batch_size", [(10, 4), (3, 8), (8, 4), (1, 1)])
def test_embed_sums_the_width_flip_and_handles_partial_batches(count, batch_size):
    symbol, args, aux, weight, bias = tiny_model()
    embedder = Embedder(symbol, args, aux, batch_size=batch_size, image_size=(6, 5))
    images = random_faces(count)
    seen = []
    got = embedder.embed(images, progress=seen.append)
    assert got.dtype == np.float32 and got.shape == (count, 4)
    np.testing.assert_allclose(got, numpy_embed(images, weight, bias), rtol=1e-5, atol=1e-3)
    assert sum(seen) == count and len(seen) == -(-count // batch_size)
    one_by_one = np.concatenate([embedder.embed(images[i:i + 1]) for i in range(count)])
    np.testing.assert_allclose(got, one_by_one, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(images[..., ::-1]), got, rtol=1e-5, atol=1e-3)   # flip-invariant
    assert not np.allclose(embedder.embed(images[:, :, ::-1]), got, atol=1e-2)                 # height is not


def test_embed_uses_fc1_output_of_a_training_graph_and_refreshes_weights():
    symbol, args, aux, weight, bias = tiny_model(head=True)
    embedder = Embedder(symbol, args, aux, batch_size=4, image_size=(6, 5))
    images = random_faces(5)
    np.testing.assert_allclose(embedder.embed(images), numpy_embed(images, weight, bias), rtol=1e-5, atol=1e-3)
    _, new_args, _, new_weight, new_bias = tiny_model(seed=7)
    embedder.set_params(dict(args, **new_args), aux)
    np.testing.assert_allclose(embedder.embed(images), numpy_embed(images, new_weight, new_bias),
                               rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="missing for the embedding graph: fc1_bias"):
        embedder.set_params({"fc1_weight": args["fc1_weight"]}, aux)
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 6, 5\)"):
        embedder.embed(random_faces(2, size=(5, 6)))


def test_refresh_reaches_conv_and_batchnorm_weights():
    """MXNet's CPU inference graph folds BN into the conv weights at its first forward and keeps them: new
    weights and moving statistics set afterwards must still show (the training loop refreshes every check)."""
    x = mx.sym.Convolution(mx.sym.Variable("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv")
    x = mx.sym.Activation(mx.sym.BatchNorm(x, fix_gamma=False, name="bn"), act_type="relu")
    symbol = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=4, name="fc1")
    arg_shapes, _, aux_shapes = symbol.infer_shape(data=(1, 3, 6, 5))

    def params(seed):
        rng = np.random.default_rng(seed)
        args = {n: mx.nd.array(rng.normal(0, 0.1, s)) for n, s in zip(symbol.list_arguments(), arg_shapes)
                if n != "data"}
        aux = {n: mx.nd.array(rng.uniform(1, 50, s)) for n, s in zip(symbol.list_auxiliary_states(), aux_shapes)}
        return args, aux

    images = random_faces(6)
    embedder = Embedder(symbol, *params(0), batch_size=4, image_size=(6, 5))
    before = embedder.embed(images)
    embedder.set_params(*params(1))
    after = embedder.embed(images)
    fresh = Embedder(symbol, *params(1), batch_size=4, image_size=(6, 5)).embed(images)
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, after, rtol=1e-2)


def save_tiny_checkpoint(prefix, image_size=(6, 5), epoch=3):
    symbol, args, aux, weight, bias = tiny_model(image_size=image_size)
    mx.model.save_checkpoint(prefix, epoch, symbol, args, aux)
    return weight, bias


def test_from_checkpoint_and_verify(tmp_path):
    prefix = str(tmp_path / "model")
    weight, bias = save_tiny_checkpoint(prefix)
    embedder = Embedder.from_checkpoint(prefix + ",3", batch_size=3, image_size=(6, 5))
    images, issame = random_faces(24), np.arange(12) % 3 == 0
    results = ver.verify(embedder, {"a": (images, issame), "b": (images[:20], issame[:10])}, nfolds=5)
    assert list(results) == ["a", "b"]
    expected = ver.evaluate(numpy_embed(images, weight, bias), issame, nfolds=5)
    # XNorm as InsightFace prints it: the mean norm of the single-view embeddings, not of their flip sum
    x = images.astype(np.float64)
    single = [v.reshape(len(v), -1) @ weight.T.astype(np.float64) + bias for v in (x, x[..., ::-1])]
    expected["xnorm"] = np.mean([np.linalg.norm(v, axis=1) for v in single])
    assert expected["xnorm"] != pytest.approx(np.linalg.norm(single[0] + single[1], axis=1).mean(), rel=1e-3)
    for key, value in expected.items():
        assert results["a"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    with pytest.raises(FileNotFoundError, match=r"model-0004\.params"):
        Embedder.from_checkpoint(prefix + ",4")
    with pytest.raises(FileNotFoundError, match=r"other-symbol\.json"):
        Embedder.from_checkpoint(str(tmp_path / "other") + ",3")
    with pytest.raises(ValueError, match="PREFIX,EPOCH"):
        Embedder.from_checkpoint(prefix)


# ------------------------------------------------------------------------------------------- CLI
def make_set(path, pairs, seed, size=(112, 112)):
    faces = random_faces(2 * pairs, size=size, seed=seed)
    issame = np.arange(pairs) % 2 == 0
    ver.write_bin(str(path), [encode(f, ".jpg") for f in faces], issame)


def test_cli_prints_a_table_and_json(tmp_path, capsys):
    prefix = str(tmp_path / "model")
    save_tiny_checkpoint(prefix, image_size=(16, 16))
    make_set(tmp_path / "lfw.bin", 20, seed=1, size=(16, 16))
    make_set(tmp_path / "agedb_30.bin", 30, seed=2, size=(16, 16))
    common = ["--model", prefix + ",3", "--data-dir", str(tmp_path), "--target", "lfw,agedb_30",
              "--batch-size", "7", "--image-size", "16,16"]
    assert ver.main(common) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split(" | ")[0].strip() == "set" and "VAL@FAR=1e-3" in table[0]
    assert table[2].startswith("lfw ") and table[2].split("|")[1].strip() == "20"
    assert table[3].startswith("agedb_30 ") and table[3].split("|")[1].strip() == "30"
    assert ver.main(common + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == prefix + ",3" and report["sets"]["agedb_30"]["pairs"] == 30
    images, issame = ver.load_bin(str(tmp_path / "lfw.bin"), (16, 16))
    embedder = Embedder.from_checkpoint(prefix + ",3", batch_size=7, image_size=(16, 16))
    embeddings = embedder.embed(images)
    expected = ver.evaluate(embeddings, issame, xnorm=embedder.last_xnorm)
    assert {k: v for k, v in report["sets"]["lfw"].items() if k != "pairs"} == pytest.approx(expected)


def test_cli_missing_model_or_set_exits_non_zero(tmp_path, capsys):
    prefix = str(tmp_path / "model")
    save_tiny_checkpoint(prefix, image_size=(16, 16))
    make_set(tmp_path / "lfw.bin", 10, seed=1, size=(16, 16))
    base = ["--data-dir", str(tmp_path), "--image-size", "16,16"]
    assert ver.main(base + ["--model", prefix + ",9", "--target", "lfw"]) == 1
    assert "model file not found" in capsys.readouterr().err
    assert ver.main(base + ["--model", prefix + ",3", "--target", "lfw,cfp_fp"]) == 1
    assert "cfp_fp.bin" in capsys.readouterr().err
    assert ver.main(base + ["--model", prefix + ",3", "--target", "lfw", "--ctx", "tpu"]) == 1
    assert "--ctx must be cpu, gpu or gpu:N" in capsys.readouterr().err


def test_cli_checks_folds_and_the_model_before_embedding(tmp_path, capsys, monkeypatch):
    """--nfolds 0, more folds than pairs, a set of one kind of pair, a damaged or unfitting model: each is one
    error line naming the value or file, and not one face is embedded first."""
    prefix = str(tmp_path / "model")
    save_tiny_checkpoint(prefix, image_size=(16, 16))
    make_set(tmp_path / "lfw.bin", 10, seed=1, size=(16, 16))
    faces = random_faces(8, size=(16, 16), seed=3)
    ver.write_bin(str(tmp_path / "same.bin"), [encode(f) for f in faces], [True] * 4)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before the arguments were checked")

    monkeypatch.setattr(Embedder, "embed", no_embedding)
    base = ["--data-dir", str(tmp_path), "--image-size", "16,16", "--model", prefix + ",3"]
    with pytest.raises(SystemExit):
        ver.main(base + ["--target", "lfw", "--nfolds", "0"])
    assert "argument --nfolds: must be >= 2, got 0" in capsys.readouterr().err
    cases = [(["--target", "lfw", "--nfolds", "11"], "lfw.bin: nfolds must be in [2, number of pairs = 10], got 11"),
             (["--target", "lfw,same", "--nfolds", "2"], "same.bin: issame must hold both same and different pairs"),
             (["--target", "lfw", "--image-size", "8,8"], "model,3 do not fit its graph on faces of 8x8")]
    for argv, message in cases:
        assert ver.main(base + argv) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("verification: error") == 1, err
    with open(prefix + "-symbol.json", "wb") as f:
        f.write(bytes(range(256)))
    assert ver.main(base + ["--target", "lfw"]) == 1
    err = capsys.readouterr().err
    assert "verification: error: %s-symbol.json is not an MXNet symbol file" % prefix in err
    assert "Traceback" not in err and err.count("verification: error") == 1
