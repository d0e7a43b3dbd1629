"""eval/embedding.py: the view logic (flip, per-view normalisation, sum, XNorm) over any backend against NumPy,
the MXNet and ONNX backends on any number of faces, and checkpoints MXNet cannot read."""
import json
import re

import cv2
import mxnet as mx
import numpy as np
import pytest

from eval import embedding, verification
from tests.eval.linear_models import linear_weights, save_linear_checkpoint, save_linear_onnx


class LinearBackend:
    """A backend that is a plain NumPy linear map of the raw pixels; records what it was given."""

    def __init__(self, weight, batch_size=3, input_shape=(3, 4, 5)):
        self.weight, self.batch_size, self.input_shape, self.dim = weight, batch_size, input_shape, len(weight)
        self.calls = []

    def forward(self, batch):
        self.calls.append(batch)
        return (batch.reshape(len(batch), -1).astype(np.float64) @ self.weight.T).astype(np.float32)


def faces(count, shape=(3, 4, 5), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count,) + shape, dtype=np.uint8)


def reference_views(images, weight):
    """float64 (plain view, flipped view) raw embeddings."""
    x = images.astype(np.float64)
    return x.reshape(len(x), -1) @ weight.T, x[..., ::-1].reshape(len(x), -1) @ weight.T


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("flip, normalize", [(True, False), (True, True), (False, False), (False, True)])
def test_views_are_combined_as_numpy_does(flip, normalize):
    weight = np.random.default_rng(1).normal(size=(6, 60))
    backend = LinearBackend(weight)
    embedder = embedding.Embedder.from_backend(backend)
    images = faces(7)
    seen = []
    got = embedder.embed(images, progress=seen.append, flip=flip, normalize_views=normalize)
    plain, flipped = reference_views(images, weight)
    if normalize:
        plain, flipped = unit(plain), unit(flipped)
    expected = plain + flipped if flip else plain
    assert got.dtype == np.float32 and got.shape == (7, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert seen == [3, 3, 1]                                        # batches of the backend's batch size
    raw = reference_views(images, weight)
    norms = np.concatenate([np.linalg.norm(v, axis=1) for v in (raw if flip else raw[:1])])
    assert embedder.last_xnorm == pytest.approx(norms.mean(), rel=1e-6)   # XNorm: raw single views, always
    call = backend.calls[0]
    assert call.dtype == np.float32 and len(call) == (6 if flip else 3)     # raw pixels, both views in one call
    np.testing.assert_array_equal(call[:3], images[:3])
    if flip:
        np.testing.assert_array_equal(call[3:], images[:3, :, :, ::-1])


def test_embed_batch_returns_the_raw_view_norms():
    weight = np.random.default_rng(2).normal(size=(4, 60))
    embedder = embedding.Embedder.from_backend(LinearBackend(weight))
    images = faces(5, seed=3)
    _, norms = embedder.embed_batch(images, flip=True, normalize_views=True)
    plain, flipped = reference_views(images, weight)
    np.testing.assert_allclose(norms, np.stack([np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)], 1),
                               rtol=1e-6)


def test_bad_input_and_bad_backends_are_named():
    weight = np.ones((4, 60))
    embedder = embedding.Embedder.from_backend(LinearBackend(weight))
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 4, 5\)"):
        embedder.embed(faces(2, shape=(3, 5, 4)))
    with pytest.raises(TypeError, match="LinearBackend takes no new parameters"):
        embedder.set_params({}, {})
    broken = LinearBackend(weight)
    broken.forward = lambda batch: np.zeros((len(batch), 3), np.float32)
    with pytest.raises(ValueError, match=r"backend returned \(4, 3\) for 4 faces, expected \(4, 4\)"):
        embedding.Embedder.from_backend(broken).embed(faces(2))


def test_mxnet_backend_takes_any_number_of_faces():
    rng = np.random.default_rng(4)
    weight, bias = rng.normal(size=(5, 60)).astype(np.float32) / 30, rng.normal(size=5).astype(np.float32)
    symbol = mx.sym.FullyConnected(mx.sym.Flatten(mx.sym.Variable("data")), num_hidden=5, name="fc1")
    backend = embedding.MXNetBackend(symbol, {"fc1_weight": mx.nd.array(weight), "fc1_bias": mx.nd.array(bias)},
                                     {}, batch_size=4, image_size=(4, 5))
    assert backend.dim == 5 and backend.input_shape == (3, 4, 5)
    for count in (0, 1, 4, 9):
        batch = faces(count, seed=count).astype(np.float32)
        got = backend.forward(batch)
        assert got.shape == (count, 5) and got.dtype == np.float32
        np.testing.assert_allclose(got, batch.reshape(count, 60).astype(np.float64) @ weight.T + bias,
                                   rtol=1e-5, atol=1e-3)


def test_onnx_backend_through_the_embedder_and_the_bin_cli(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("eval.onnx_backend")
    weight, bias = linear_weights((3, 16, 16), dim=6, seed=5)
    onnx_path, prefix = str(tmp_path / "linear.onnx"), str(tmp_path / "linear")
    save_linear_onnx(onnx_path, weight, bias, (3, 16, 16))
    save_linear_checkpoint(prefix, weight, bias)
    embedder = embedding.Embedder.from_onnx(onnx_path, batch_size=4, image_size=(16, 16))
    assert embedder.dim == 6 and embedder.input_shape == (3, 16, 16)
    images = faces(9, shape=(3, 16, 16), seed=6)
    plain, flipped = (v + bias for v in reference_views(images, weight.astype(np.float64)))
    np.testing.assert_allclose(embedder.embed(images), plain + flipped, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embedder.embed(images, normalize_views=True), unit(plain) + unit(flipped), atol=1e-5)
    # the .bin CLI: the same figures from --onnx as from the same weights as a checkpoint
    faces_bgr = faces(40, shape=(16, 16, 3), seed=7)
    verification.write_bin(str(tmp_path / "set.bin"), [cv2.imencode(".png", f)[1].tobytes() for f in faces_bgr],
                           np.arange(20) % 2 == 0)
    reports = []
    for model in (["--onnx", onnx_path], ["--model", prefix + ",1"]):
        assert verification.main(model + ["--data-dir", str(tmp_path), "--target", "set", "--image-size", "16,16",
                                          "--nfolds", "5", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["model"] == onnx_path
    assert reports[0]["sets"]["set"] == pytest.approx(reports[1]["sets"]["set"], rel=1e-4)


def test_checkpoint_files_mxnet_cannot_read_are_named(tmp_path):
    """Garbage or non-graph JSON, truncated or foreign params, parameters of other shapes: one ValueError
    naming the file (MXNet's own message names none)."""
    weight, bias = linear_weights((3, 4, 5), dim=5, seed=1)
    prefix = str(tmp_path / "m")
    save_linear_checkpoint(prefix, weight, bias)
    good_json, good_params = open(prefix + "-symbol.json", "rb").read(), open(prefix + "-0001.params", "rb").read()
    json_path, params_path = prefix + "-symbol.json", prefix + "-0001.params"
    cases = [(json_path, bytes(range(200, 256)) * 3, json_path + " is not an MXNet symbol file"),
             (json_path, b'{"nodes": 3}', json_path + " is not an MXNet symbol file"),
             (params_path, good_params[:len(good_params) // 2], params_path + " is not a readable MXNet parameter"),
             (params_path, b"", params_path + " is not a readable MXNet parameter")]
    for path, content, message in cases:
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            embedding.Embedder.from_checkpoint(prefix + ",1", image_size=(4, 5))
        with open(json_path, "wb") as f:
            f.write(good_json)
        with open(params_path, "wb") as f:
            f.write(good_params)
    mx.nd.save(params_path, {"fc1_weight": mx.nd.array(weight), "fc1_bias": mx.nd.array(bias)})   # no arg: keys
    with pytest.raises(ValueError, match=re.escape(params_path + " holds no 'arg:NAME'")):
        embedding.Embedder.from_checkpoint(prefix + ",1", image_size=(4, 5))
    with open(params_path, "wb") as f:
        f.write(good_params)
    with pytest.raises(ValueError, match=re.escape("the parameters of %s,1 do not fit its graph on faces of 6x6"
                                                   % prefix)):
        embedding.Embedder.from_checkpoint(prefix + ",1", image_size=(6, 6))
    assert embedding.Embedder.from_checkpoint(prefix + ",1", image_size=(4, 5)).dim == 5
