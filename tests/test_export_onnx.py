"""tools/export_onnx.py (with onnx_repair.py, onnx_check.py) and eval/onnx_backend.py: a tiny graph with every
repaired op against a NumPy reference (and MXNet's unrepaired export failing in ONNX Runtime), backbones with
trained-like weights against MXNet, insightface.model_zoo's test for a graph that normalises its own input (plain
and simplified; graphs in InsightFace's own layout), the backend's batching and errors, and the CLI.

CI exports mbf (both activations) and r18 (prelu, the IResNet head and blocks) at batch 1 and 8; the deeper
IResNets repeat the same blocks. ONNX_ALL_BACKBONES=1 runs every backbone x activation at batch 1 and 8
(docs/onnx.md has that table, from tools/export_onnx.py --check-backbones)."""
import os

import mxnet as mx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import symbols
from eval.onnx_backend import OnnxBackend
from tools import export_onnx, onnx_check, onnx_repair

TINY_SIZE = (6, 5)               # H, W; neither equals a channel count, so a mis-broadcast slope cannot pass
EPS = 1e-5


# ----------------------------------------------------------------------------------- tiny graph
def tiny_symbol():
    """The ops the repairs touch: PReLU on a map and on a vector, BN with gamma learnt / fixed (explicitly and
    by MXNet's default), in-graph input normalisation, FC; output fc1_output."""
    x = (mx.sym.Variable("data") - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=4, kernel=(1, 1), no_bias=True, name="conv")
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=EPS, name="bn_learnt")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="act_map")
    x = mx.sym.BatchNorm(x, eps=EPS, name="bn_default")                 # MXNet's default: fix_gamma=True
    x = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=6, name="fc")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="act_vec")
    return mx.sym.BatchNorm(x, fix_gamma=True, eps=EPS, name="fc1")


def tiny_params(seed=0):
    """Random parameters, every gamma (fixed ones too) far from 1, moving statistics non-trivial."""
    rng = np.random.default_rng(seed)
    arg_shapes, _, aux_shapes = tiny_symbol().infer_shape(data=(1, 3) + TINY_SIZE)
    arg = {}
    for name, shape in zip(tiny_symbol().list_arguments(), arg_shapes):
        if name != "data":
            low, high = (0.05, 0.45) if name.startswith("act_") else (-1.5, 1.5)
            arg[name] = rng.uniform(low, high, shape).astype(np.float32)
    aux = {name: (rng.uniform(0.5, 2.0, shape) if name.endswith("var") else rng.normal(0, 0.3, shape))
           .astype(np.float32) for name, shape in zip(tiny_symbol().list_auxiliary_states(), aux_shapes)}
    return ({k: mx.nd.array(v) for k, v in arg.items()}, {k: mx.nd.array(v) for k, v in aux.items()})


def tiny_reference(faces, arg, aux):
    """NumPy float64 forward of tiny_symbol in inference mode."""
    p = {k: v.asnumpy().astype(np.float64) for k, v in list(arg.items()) + list(aux.items())}

    def batch_norm(x, name, fixed):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        gamma = np.ones_like(p[name + "_beta"]) if fixed else p[name + "_gamma"]
        scale = gamma / np.sqrt(p[name + "_moving_var"] + EPS)
        return (x - p[name + "_moving_mean"].reshape(shape)) * scale.reshape(shape) + p[name + "_beta"].reshape(shape)

    def prelu(x, name):
        slope = p[name + "_gamma"].reshape((1, -1) + (1,) * (x.ndim - 2))
        return np.where(x > 0, x, x * slope)

    x = (faces.astype(np.float64) - 127.5) * 0.0078125
    x = np.einsum("oc,nchw->nohw", p["conv_weight"][:, :, 0, 0], x)
    x = prelu(batch_norm(x, "bn_learnt", False), "act_map")
    x = batch_norm(x, "bn_default", True).reshape(len(faces), -1)
    x = prelu(x @ p["fc_weight"].T + p["fc_bias"], "act_vec")
    return batch_norm(x, "fc1", True)


def faces(count, size=TINY_SIZE, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (count, 3) + size).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model():
    arg, aux = tiny_params()
    return onnx_repair.export(tiny_symbol(), arg, aux, batch_size=None, image_size=TINY_SIZE), arg, aux


def test_tiny_graph_matches_numpy_reference(tiny_model):
    model, arg, aux = tiny_model
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert [value.name for value in graph.input] == ["data"]           # parameters are initialisers only
    assert [value.name for value in graph.output] == ["fc1_output"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 6, 5]
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert initializers["act_map_gamma"].shape == (4, 1, 1) and initializers["act_vec_gamma"].shape == (6,)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for count in (1, 3):
        batch = faces(count, seed=count)
        expected = tiny_reference(batch, arg, aux)
        got = session.run(["fc1_output"], {"data": batch})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        # and MXNet itself computes what the reference says (fixed gammas read as 1)
        np.testing.assert_allclose(onnx_check.mxnet_embeddings(tiny_symbol(), arg, aux, batch), expected,
                                   rtol=1e-4, atol=1e-4)


def test_unrepaired_mxnet_export_fails_in_onnxruntime(tmp_path):
    arg, aux = tiny_params()
    path = str(tmp_path / "plain.onnx")
    mx.onnx.export_model(tiny_symbol(), [arg, aux], [(2, 3) + TINY_SIZE], np.float32, path)
    plain = onnx.load(path)
    assert len(plain.graph.input) > 1                          # the parameters are graph inputs too
    # ONNX Runtime 1.32 loads it and fails in the first PReLU; 1.19 (Python < 3.11) refuses opset 22 at load
    with pytest.raises(Exception, match="broadcast|Opset 22"):
        ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"data": faces(2)})


def test_simplified_tiny_graph_is_standard_and_equal(tiny_model):
    model, arg, aux = tiny_model
    simplified = onnx_repair.simplify(model)
    onnx.checker.check_model(simplified, full_check=True)
    def count(graph, op_type):
        return sum(node.op_type == op_type for node in graph.node)
    # the BN right after the convolution is folded into it; the two after a PReLU stay
    assert (count(model.graph, "BatchNormalization"), count(simplified.graph, "BatchNormalization")) == (3, 2)
    assert {o.domain for o in simplified.opset_import} <= {"", "ai.onnx"}
    session = ort.InferenceSession(simplified.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = faces(4)
    np.testing.assert_allclose(session.run(["fc1_output"], {"data": batch})[0], tiny_reference(batch, arg, aux),
                               rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------- insightface.model_zoo's reading
def insightface_takes_raw_pixels(model):
    """The rule of insightface.model_zoo's ArcFaceONNX (python-package/insightface/model_zoo/arcface_onnx.py):
    when among the graph's first 8 nodes one name starts with 'Sub' or '_minus' and one with 'Mul' or '_mul', the
    model normalises its own input and gets the pixels as they are (input_mean 0, input_std 1); otherwise it
    gets (x - 127.5) / 127.5."""
    names = [node.name for node in model.graph.node[:8]]
    return any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)


def insightface_embeddings(model, faces):
    """What ArcFaceONNX.forward returns for ``faces`` (raw RGB NCHW): its routing (model_zoo.ModelRouter: under 5
    outputs and a 112 x 112 input, one output) checked, its mean / std chosen by the rule above."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape, outputs = session.get_inputs()[0].shape, session.get_outputs()
    assert len(outputs) == 1 and shape[2] == shape[3] == 112
    mean, std = (0.0, 1.0) if insightface_takes_raw_pixels(model) else (127.5, 127.5)
    return session.run([outputs[0].name], {session.get_inputs()[0].name: (faces - mean) / std})[0]


def _normalised_input(x, offset_name=None, scale_name=None):
    if offset_name is None:
        return (x - 127.5) * 0.0078125
    x = mx.sym._internal._minus_scalar(x, scalar=127.5, name=offset_name)
    return mx.sym._internal._mul_scalar(x, scalar=0.0078125, name=scale_name)


def side_branch_symbol(normalise, decoys, offset_name=None, scale_name=None):
    """A graph whose first nodes, in MXNet's order and so in the export's, are a side branch on the raw pixels
    (with ``decoys``, a Sub and a Mul by constants that MXNet names _minusscalar* / _mulscalar*), before the
    input's own scaling (when ``normalise``) and the main branch."""
    data = mx.sym.Variable("data")
    side = mx.sym.flatten(mx.sym.Pooling(data, global_pool=True, kernel=(1, 1), pool_type="avg", name="side_pool"))
    side = mx.sym.FullyConnected((side - 0.5) * 2.0 if decoys else side, num_hidden=6, name="side_fc")
    x = _normalised_input(data, offset_name, scale_name) if normalise else data
    x = mx.sym.Convolution(x, num_filter=4, kernel=(1, 1), no_bias=True, name="conv")
    x = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=6, name="fc")
    return mx.sym.elemwise_add(side, mx.sym.BatchNorm(x, fix_gamma=False, eps=EPS, name="bn"), name="out")


def _random_params(symbol, size=TINY_SIZE, seed=0):
    rng = np.random.default_rng(seed)
    arg_shapes, _, aux_shapes = symbol.infer_shape(data=(1, 3) + size)
    arg = {n: mx.nd.array(rng.uniform(-1, 1, s)) for n, s in zip(symbol.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.array(rng.uniform(0.5, 2.0, s)) for n, s in zip(symbol.list_auxiliary_states(), aux_shapes)}
    return arg, aux


def test_insightface_sees_the_normalisation_of_the_tiny_graph(tiny_model):
    model, arg, aux = tiny_model
    for graph in (model, onnx_repair.simplify(model)):
        assert insightface_takes_raw_pixels(graph)
        assert [n.op_type for n in graph.graph.node[:2]] == ["Sub", "Mul"]


def test_input_scaling_is_named_and_placed_on_purpose(tmp_path):
    """Names MXNet would not give (pixel_offset / pixel_scale), after a side branch of 10 exported nodes: MXNet's
    own export fails the rule, this one meets it, and the embeddings are unchanged."""
    symbol = side_branch_symbol(True, False, "pixel_offset", "pixel_scale")
    arg, aux = _random_params(symbol)
    path = str(tmp_path / "plain.onnx")
    mx.onnx.export_model(symbol, dict(arg, **aux), [(1, 3) + TINY_SIZE], np.float32, path)
    names = [node.name for node in onnx.load(path).graph.node]
    assert names.index("pixel_offset") >= 8 and not insightface_takes_raw_pixels(onnx.load(path))
    model = onnx_repair.export(symbol, arg, aux, image_size=TINY_SIZE)
    onnx.checker.check_model(model, full_check=True)
    assert [(n.op_type, n.name) for n in model.graph.node[:2]] == [("Sub", "_minus_input_pixel_offset"),
                                                                    ("Mul", "_mul_input_pixel_scale")]
    assert insightface_takes_raw_pixels(model) and insightface_takes_raw_pixels(onnx_repair.simplify(model))
    batch = faces(3)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["fc1_output"], {"data": batch})[0],
                               onnx_check.mxnet_embeddings(symbol, arg, aux, batch), rtol=1e-4, atol=1e-4)


def test_a_graph_without_normalisation_is_not_taken_for_one(tmp_path):
    """Its first nodes hold a _minusscalar and a _mulscalar that are no input scaling: MXNet's own export passes
    the rule by those names (insightface would then feed raw pixels to a graph that expects them scaled); this
    export does not."""
    symbol = side_branch_symbol(False, True)
    arg, aux = _random_params(symbol)
    path = str(tmp_path / "plain.onnx")
    mx.onnx.export_model(symbol, dict(arg, **aux), [(1, 3) + TINY_SIZE], np.float32, path)
    assert insightface_takes_raw_pixels(onnx.load(path))
    model = onnx_repair.export(symbol, arg, aux, image_size=TINY_SIZE)
    assert not insightface_takes_raw_pixels(model)
    renamed = [n.op_type for n in model.graph.node[:8] if n.name.startswith(("node__minus", "node__mul"))]
    assert sorted(renamed) == ["Mul", "Sub"]
    assert not insightface_takes_raw_pixels(onnx_repair.simplify(model))


@pytest.mark.parametrize("layout", ["fresnet", "fmobilefacenet"])
def test_insightface_layouts_export_for_model_zoo(layout):
    """InsightFace's own graphs (fresnet: identity 'id' before the scaling; both: an FC on a 4-D map, no flatten
    attribute) through the exporter: model_zoo reads them as ArcFaceONNX taking raw pixels, with MXNet's
    embeddings."""
    from tests import insightface_graphs as insightface

    def build(bn_mom):
        if layout == "fresnet":
            return insightface.fresnet(18, embedding_size=16, bn_mom=bn_mom)
        return insightface.fmobilefacenet(embedding_size=16, bn_mom=bn_mom)
    arg, aux = insightface.trained_like(build)
    symbol = build(0.9)
    model = onnx_repair.export(symbol, arg, aux)
    first = ["Identity", "Sub", "Mul"] if layout == "fresnet" else ["Sub", "Mul", "Conv"]
    assert [n.op_type for n in model.graph.node[:3]] == first
    batch = onnx_check.random_faces(2, (112, 112))
    expected = onnx_check.mxnet_embeddings(symbol, arg, aux, batch)
    got = insightface_embeddings(model, batch)
    assert onnx_check.agreement(expected, got)[1] <= 1e-4


# ------------------------------------------------------------------------------------------ backbones
CI_CASES = [("mbf", "prelu", (1, 8)), ("mbf", "prelu_conv", (1, 8)), ("r18", "prelu", (1, 8))]
ALL_CASES = [(net, act, (1, 8)) for net in ("r18", "r34", "r50", "r100", "r200", "mbf")
             for act in ("prelu", "prelu_conv")]


@pytest.mark.parametrize("network,act_type,batches", ALL_CASES if os.environ.get("ONNX_ALL_BACKBONES") else CI_CASES)
def test_backbone_export_matches_mxnet(network, act_type, batches):
    symbol, arg, aux = onnx_check.trained_like_params(
        lambda bn_mom: symbols.get_symbol(network, act_type=act_type, bn_mom=bn_mom))
    model = onnx_repair.export(symbol, arg, aux, batch_size=None)
    onnx.checker.check_model(model, full_check=True)
    assert [value.name for value in model.graph.input] == ["data"]
    assert insightface_takes_raw_pixels(model)
    for count in batches:                                        # one dynamic model, several batch sizes
        batch = onnx_check.random_faces(count, (112, 112), seed=count)
        expected = onnx_check.mxnet_embeddings(symbol, arg, aux, batch).astype(np.float64)
        # as insightface.model_zoo.get_model runs it (ArcFaceONNX)
        got = insightface_embeddings(model, batch).astype(np.float64)
        assert got.shape == (count, 512)
        norms = np.linalg.norm(expected, axis=1)
        assert norms.min() > 1.0                                 # a real embedding, not a collapsed one
        cosine = (expected * got).sum(axis=1) / (norms * np.linalg.norm(got, axis=1))
        assert cosine.min() >= 0.99999, (count, cosine.min())
        assert (np.abs(got - expected).max(axis=1) / norms).max() <= 1e-4


def test_agreement_against_hand_computed_rows():
    reference = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    candidate = np.array([[3.0, 4.5], [1.0, 0.0]], np.float32)
    cosine, relative = onnx_check.agreement(reference, candidate)
    assert cosine == pytest.approx((9 + 18) / (5 * np.sqrt(9 + 20.25)), abs=1e-12)   # the worst row: the first
    assert relative == pytest.approx(0.5 / 5, abs=1e-12)


# ---------------------------------------------------------------------------------------- backend
@pytest.fixture(scope="module")
def tiny_files(tiny_model, tmp_path_factory):
    """The tiny model saved dynamic and with a fixed batch of 3."""
    folder = tmp_path_factory.mktemp("onnx")
    model, arg, aux = tiny_model
    fixed = onnx_repair.export(tiny_symbol(), arg, aux, batch_size=3, image_size=TINY_SIZE)
    paths = {"dynamic": str(folder / "dynamic.onnx"), "fixed": str(folder / "fixed.onnx")}
    onnx.save(model, paths["dynamic"])
    onnx.save(fixed, paths["fixed"])
    return paths, arg, aux


@pytest.mark.parametrize("kind,expected_batch", [("dynamic", 2), ("fixed", 3)])
def test_backend_any_count_matches_reference(tiny_files, kind, expected_batch):
    paths, arg, aux = tiny_files
    backend = OnnxBackend(paths[kind], batch_size=2, image_size=TINY_SIZE)
    assert (backend.batch_size, backend.input_shape, backend.dim) == (expected_batch, (3, 6, 5), 6)
    for count in (0, 1, 3, 7):                                   # below, at and across the batch size
        batch = faces(count, seed=10 + count)
        out = backend.forward(batch)
        assert out.dtype == np.float32 and out.shape == (count, 6)
        if count:
            np.testing.assert_allclose(out, tiny_reference(batch, arg, aux), rtol=1e-4, atol=1e-4)


def test_backend_errors_name_the_file(tiny_files, tmp_path):
    paths, _, _ = tiny_files
    missing = str(tmp_path / "nothing.onnx")
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        OnnxBackend(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="garbage.onnx"):
        OnnxBackend(str(garbage))
    with pytest.raises(ValueError, match="dynamic.onnx.*expected \\(batch, 3, 112, 112\\)"):
        OnnxBackend(paths["dynamic"])                            # the tiny model takes 6x5 faces
    backend = OnnxBackend(paths["dynamic"], image_size=TINY_SIZE)
    with pytest.raises(ValueError, match="faces must be"):
        backend.forward(np.zeros((2, 3, 5, 6), np.float32))


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    arg, aux = tiny_params(seed=3)
    prefix = str(tmp_path_factory.mktemp("ckpt") / "model")
    # a training graph on top of the embedding: the exporter must cut it at fc1_output
    loss = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(tiny_symbol(), num_hidden=3, name="fc7"), name="softmax")
    arg_all = dict(arg, fc7_weight=mx.nd.ones((3, 6)), fc7_bias=mx.nd.zeros(3))
    mx.model.save_checkpoint(prefix, 2, loss, arg_all, aux)
    return prefix, arg, aux


@pytest.mark.parametrize("batch_flag,simplify", [("dynamic", True), ("4", False)])
def test_cli_exports_checks_and_writes(tiny_checkpoint, tmp_path, batch_flag, simplify):
    prefix, arg, aux = tiny_checkpoint
    out = str(tmp_path / "tiny.onnx")
    argv = ["--model", prefix + ",2", "--output", out, "--batch-size", batch_flag, "--image-size", "6,5"]
    assert export_onnx.main(argv + (["--simplify"] if simplify else [])) == 0
    assert insightface_takes_raw_pixels(onnx.load(out))
    backend = OnnxBackend(out, batch_size=5, image_size=TINY_SIZE)
    assert backend.batch_size == (5 if batch_flag == "dynamic" else 4)
    batch = faces(6, seed=7)
    np.testing.assert_allclose(backend.forward(batch), tiny_reference(batch, arg, aux), rtol=1e-4, atol=1e-4)


def test_cli_errors_and_writes_nothing_on_failure(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    prefix, _, _ = tiny_checkpoint
    out = tmp_path / "tiny.onnx"
    assert export_onnx.main(["--model", prefix + ",7", "--output", str(out), "--image-size", "6,5"]) == 1
    assert "model-0007.params" in capsys.readouterr().err and not out.exists()
    # a model that disagrees with MXNet is not written: force the comparison to fail
    monkeypatch.setattr(onnx_check, "MAX_RELATIVE_DIFF", -1.0)
    assert export_onnx.main(["--model", prefix + ",2", "--output", str(out), "--image-size", "6,5"]) == 1
    assert "disagrees with MXNet" in capsys.readouterr().err and not out.exists()
    assert os.listdir(tmp_path) == []                            # no temporary file left either
    with pytest.raises(SystemExit):
        export_onnx.parse_args(["--model", prefix + ",2", "--output", str(out), "--batch-size", "0"])


def test_cli_checks_the_output_first_and_names_damaged_model_files(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """An --output that is a folder or lies under a file is refused before the model is even loaded; a damaged
    symbol JSON or truncated params is one error line naming the file (MXNet's own message names none)."""
    prefix, _, _ = tiny_checkpoint
    (tmp_path / "file").write_text("")
    real_load = export_onnx.load_checkpoint
    monkeypatch.setattr(export_onnx, "load_checkpoint", lambda spec: pytest.fail("loaded before the output check"))
    for output, message in ((tmp_path, "--output %s is a folder" % tmp_path),
                            (tmp_path / "file" / "m.onnx", "%s is a file, not a folder" % (tmp_path / "file"))):
        assert export_onnx.main(["--model", prefix + ",2", "--output", str(output), "--image-size", "6,5"]) == 1
        assert message in capsys.readouterr().err
    monkeypatch.setattr(export_onnx, "load_checkpoint", real_load)
    broken = str(tmp_path / "broken")
    with open(prefix + "-symbol.json") as f, open(broken + "-symbol.json", "w") as out:
        out.write(f.read()[:200])                                   # cut JSON
    with open(prefix + "-0002.params", "rb") as f, open(broken + "-0002.params", "wb") as out:
        out.write(f.read())
    out = tmp_path / "m.onnx"
    assert export_onnx.main(["--model", broken + ",2", "--output", str(out), "--image-size", "6,5"]) == 1
    err = capsys.readouterr().err
    assert "error: %s-symbol.json is not an MXNet symbol file" % broken in err and "Traceback" not in err
    with open(prefix + "-symbol.json") as f, open(broken + "-symbol.json", "w") as dst:
        dst.write(f.read())
    with open(broken + "-0002.params", "r+b") as f:
        f.truncate(os.path.getsize(broken + "-0002.params") // 2)
    assert export_onnx.main(["--model", broken + ",2", "--output", str(out), "--image-size", "6,5"]) == 1
    assert "error: %s-0002.params is not a readable MXNet parameter file" % broken in capsys.readouterr().err
    assert not out.exists()
    for argv in (["--image-size", "6,x"], ["--threads", "-1"], ["--batches", "1,0"]):
        with pytest.raises(SystemExit):
            export_onnx.parse_args(["--check-backbones", "mbf"] + argv)
        assert "error: argument " + argv[0] in capsys.readouterr().err
