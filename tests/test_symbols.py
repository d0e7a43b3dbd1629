"""symbols/: shapes, parameter counts against the published models, NumPy references of the blocks and heads,
forward + backward, checkpoint round trip, fp16 graphs, errors; tools/count_flops.py's counting."""
import json

import mxnet as mx
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import symbols
from symbols import common, iresnet, mobilefacenet
from tools import count_flops

# sum(p.numel() for p in model.parameters()) of InsightFace's arcface_torch models at 512-d: conv / FC weights,
# FC bias, BN weight + bias, PReLU slopes; BN running statistics are buffers, not parameters. The comparable
# MXNet count is therefore every argument of the symbol except `data` (BN moving mean / var are aux states,
# left out). The IResNet's last BN keeps gamma fixed at 1 (fix_gamma=True here, requires_grad=False there),
# but both frameworks still hold that gamma as a parameter, so it is counted on both sides and the counts agree
# exactly (the issue allows 0.5 %).
PUBLISHED_PARAMS = {"r18": 24025600, "r34": 34139328, "r50": 43590848, "r100": 65156160, "r200": 118833920,
                    "mbf": 2059520}
BATCH = (2,) + symbols.INPUT_SHAPE


def arg_shapes(sym, data_shape=BATCH):
    shapes, _, _ = sym.infer_shape(data=data_shape)
    return dict(zip(sym.list_arguments(), shapes))


# ---------------------------------------------------------------- NumPy references

def np_conv(x, w, stride=1, pad=0, groups=1):
    """Grouped 2-D convolution (cross-correlation), NCHW, weight (O, C/groups, kh, kw)."""
    n, c, _, _ = x.shape
    out_c, c_per_group, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    ho, wo = win.shape[2:4]
    win = win.reshape(n, groups, c_per_group, ho, wo, kh, kw)
    out = np.einsum("ngchwij,gocij->ngohw", win, w.reshape(groups, out_c // groups, c_per_group, kh, kw))
    return out.reshape(n, out_c, ho, wo)


def np_bn(x, p, name, eps=common.BN_EPS, fix_gamma=False):
    """Inference-mode BatchNorm over axis 1 with the moving statistics."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma = 1.0 if fix_gamma else p[name + "_gamma"].reshape(shape)
    mean, var = p[name + "_moving_mean"].reshape(shape), p[name + "_moving_var"].reshape(shape)
    return (x - mean) / np.sqrt(var + eps) * gamma + p[name + "_beta"].reshape(shape)


def np_act(x, p, name, act_type):
    if act_type == "relu":
        return np.maximum(x, 0)
    return np.where(x > 0, x, x * p[name + "_gamma"].reshape(1, -1, 1, 1))


def np_ir_block(x, p, name, stride, act_type):
    """The IR unit written out: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + conv1x1/BN shortcut."""
    y = np_conv(np_bn(x, p, name + "_bn1"), p[name + "_conv1_weight"], 1, 1)
    y = np_act(np_bn(y, p, name + "_bn2"), p, name + "_act", act_type)
    y = np_bn(np_conv(y, p[name + "_conv2_weight"], stride, 1), p, name + "_bn3")
    shortcut = np_bn(np_conv(x, p[name + "_down_conv_weight"], stride, 0), p, name + "_down_bn")
    return y + shortcut


def np_mbf_bottleneck(x, p, name, groups, act_type):
    """MobileFaceNet residual bottleneck: 1x1 expand -> depthwise 3x3 -> linear 1x1, + identity."""
    y = np_act(np_bn(np_conv(x, p[name + "_expand_conv_weight"]), p, name + "_expand_bn"), p,
               name + "_expand_act", act_type)
    y = np_act(np_bn(np_conv(y, p[name + "_dw_conv_weight"], 1, 1, groups), p, name + "_dw_bn"), p,
               name + "_dw_act", act_type)
    return np_bn(np_conv(y, p[name + "_project_conv_weight"]), p, name + "_project_bn") + x


def random_params(sym, data_shape, rng):
    """Random values for every argument and aux state (positive variances), as a NumPy dict."""
    shapes, _, aux = sym.infer_shape(data=data_shape)
    p = {name: rng.standard_normal(s).astype(np.float32) * 0.5 for name, s in zip(sym.list_arguments(), shapes)}
    for name, s in zip(sym.list_auxiliary_states(), aux):
        p[name] = (rng.uniform(0.5, 2.0, s) if name.endswith("_var") else rng.standard_normal(s) * 0.1)
    return {k: v.astype(np.float32) for k, v in p.items()}


def run_inference(sym, p):
    """Forward in inference mode with the given NumPy arguments / aux states."""
    args = {k: mx.nd.array(p[k]) for k in sym.list_arguments()}
    aux = {k: mx.nd.array(p[k]) for k in sym.list_auxiliary_states()}
    return sym.bind(mx.cpu(), args=args, aux_states=aux, grad_req="null").forward(is_train=False)[0].asnumpy()


# ---------------------------------------------------------------- shapes and counts

@pytest.mark.parametrize("name", symbols.NETWORKS)
@pytest.mark.parametrize("embedding_size", [128, 512])
def test_output_is_fc1_with_the_embedding_shape(name, embedding_size):
    sym = symbols.get_symbol(name, embedding_size=embedding_size)
    assert sym.list_outputs() == ["fc1_output"]
    assert sym.list_arguments()[0] == "data"
    _, out_shapes, _ = sym.infer_shape(data=(3,) + symbols.INPUT_SHAPE)
    assert out_shapes == [(3, embedding_size)]


@pytest.mark.parametrize("name", symbols.NETWORKS)
def test_parameter_count_matches_the_published_model(name):
    params, moving = count_flops.param_count(symbols.get_symbol(name, embedding_size=512))
    assert abs(params - PUBLISHED_PARAMS[name]) <= 0.005 * PUBLISHED_PARAMS[name]
    assert params == PUBLISHED_PARAMS[name]      # in fact exact: same layers, same parameter tensors
    # the moving statistics: a mean and a var per BN channel, i.e. as many as the BN gammas
    bn_channels = sum(np.prod(s) for n, s in arg_shapes(symbols.get_symbol(name)).items()
                      if n.endswith("_gamma") and not n.endswith("_act_gamma"))
    assert moving == 2 * bn_channels


def test_prelu_conv_and_relu_variants_keep_shapes_and_names():
    base = arg_shapes(symbols.get_symbol("r18"))
    assert arg_shapes(symbols.get_symbol("r18", act_type="prelu_conv")) == base   # interchangeable checkpoints
    relu = arg_shapes(symbols.get_symbol("r18", act_type="relu"))
    assert set(base) - set(relu) == {n for n in base if n.endswith("_act_gamma")}


# ---------------------------------------------------------------- NumPy references

def test_input_normalisation_is_in_the_graph():
    rng = np.random.default_rng(0)
    sym = symbols.get_symbol("mbf")
    normalised = [s for s in sym.get_internals() if s.name.startswith("_mulscalar")][0]
    x = rng.integers(0, 256, (2, 3, 8, 8)).astype(np.float32)
    out = normalised.bind(mx.cpu(), {"data": mx.nd.array(x)}).forward()[0].asnumpy()
    np.testing.assert_allclose(out, (x - 127.5) * 0.0078125, rtol=0, atol=1e-7)


@pytest.mark.parametrize("act_type", common.ACT_TYPES)
def test_ir_block_matches_numpy(act_type):
    rng = np.random.default_rng(1)
    opt = common.Options(act_type=act_type)
    sym = iresnet._block(mx.sym.Variable("data"), "u", 6, 2, True, opt)
    shape = (2, 4, 9, 9)
    p = random_params(sym, shape, rng)
    p["data"] = rng.standard_normal(shape).astype(np.float32)
    out = run_inference(sym, p)
    assert out.shape == (2, 6, 5, 5)
    np.testing.assert_allclose(out, np_ir_block(p["data"], p, "u", 2, act_type), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_type", ["prelu", "prelu_conv"])
def test_mobilefacenet_bottleneck_matches_numpy(act_type):
    rng = np.random.default_rng(2)
    opt = common.Options(act_type=act_type)
    sym = mobilefacenet._depthwise(mx.sym.Variable("data"), "b", 4, 8, 1, opt, residual=True)
    shape = (2, 4, 7, 7)
    p = random_params(sym, shape, rng)
    p["data"] = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(run_inference(sym, p), np_mbf_bottleneck(p["data"], p, "b", 8, act_type),
                               rtol=1e-4, atol=1e-4)


def test_embedding_head_matches_numpy_with_fixed_gamma():
    rng = np.random.default_rng(3)
    sym = common.embedding_head_e(mx.sym.Variable("data"), 5, 0.0, common.Options())
    shape = (3, 4, 2, 2)
    p = random_params(sym, shape, rng)
    p["data"] = rng.standard_normal(shape).astype(np.float32)
    p["fc1_gamma"][:] = 3.0                     # fix_gamma: the graph must ignore it
    x = np_bn(p["data"], p, "bn_head").reshape(3, -1)
    want = np_bn(x @ p["pre_fc1_weight"].T + p["pre_fc1_bias"], p, "fc1", fix_gamma=True)
    np.testing.assert_allclose(run_inference(sym, p), want, rtol=1e-4, atol=1e-4)


def test_prelu_conv_gradients_match_numpy():
    """Forward and both gradients of the depthwise-conv PReLU against the closed form."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    slopes = rng.uniform(0.05, 0.5, 3).astype(np.float32)
    head = rng.standard_normal(x.shape).astype(np.float32)
    sym = common.act(mx.sym.Variable("data"), "a", 3, common.Options(act_type="prelu_conv"))
    args = {"data": mx.nd.array(x), "a_gamma": mx.nd.array(slopes)}
    grads = {k: mx.nd.zeros(v.shape) for k, v in args.items()}
    exe = sym.bind(mx.cpu(), args=args, args_grad=grads)
    out = exe.forward(is_train=True)[0].asnumpy()
    exe.backward([mx.nd.array(head)])
    g = slopes.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(out, np.where(x > 0, x, g * x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["data"].asnumpy(), head * np.where(x > 0, 1.0, g), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["a_gamma"].asnumpy(), (head * np.minimum(x, 0)).sum(axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- training / checkpoints

@pytest.mark.parametrize("name", ["mbf", "r18"])
def test_forward_backward_on_cpu(name):
    mod = mx.mod.Module(symbols.get_symbol(name), label_names=None)
    mod.bind(data_shapes=[("data", BATCH)], for_training=True)
    mod.init_params(mx.init.Xavier())
    arg_params, _ = mod.get_params()
    # the PReLU slopes take the graph's own initial value, not the initialiser's "gamma = 1"
    slopes = arg_params["stem_act_gamma"].asnumpy()
    np.testing.assert_array_equal(slopes, np.full(slopes.shape, common.PRELU_INIT, np.float32))
    pixels = np.random.default_rng(5).uniform(0, 255, BATCH)
    # an inference forward on the training-bound module first (a verification pass before training does
    # this): with the GDC BN on the 1x1 map, MXNet 1.9.1's oneDNN BatchNorm segfaulted here
    mod.forward(mx.io.DataBatch([mx.nd.array(pixels)]), is_train=False)
    assert np.isfinite(mod.get_outputs()[0].asnumpy()).all()
    mod.forward(mx.io.DataBatch([mx.nd.array(pixels)]), is_train=True)
    out = mod.get_outputs()[0].asnumpy()
    assert out.shape == (2, 512) and np.isfinite(out).all()
    # a random head gradient: a constant one is removed by the last BN (its batch mean), leaving zeros
    mod.backward([mx.nd.array(np.random.default_rng(8).standard_normal((2, 512)))])
    grads = dict(zip(mod._exec_group.param_names, mod._exec_group.grad_arrays))
    for param in ("stem_conv_weight", "stem_act_gamma", "pre_fc1_weight"):
        grad = grads[param][0].asnumpy()
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


@pytest.mark.filterwarnings("ignore:Cannot decide type")     # SymbolBlock.imports' own type probe
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    rng = np.random.default_rng(6)
    sym = symbols.get_symbol("mbf", embedding_size=128)
    trained = mx.mod.Module(sym, label_names=None)
    trained.bind(data_shapes=[("data", BATCH)], for_training=False)
    trained.init_params(mx.init.Xavier())
    arg_params, aux_params = trained.get_params()
    for name, value in aux_params.items():        # non-trivial moving statistics, so that they must round-trip
        value[:] = rng.uniform(0.5, 2.0, value.shape) if name.endswith("_var") else rng.normal(0, .1, value.shape)
    prefix = str(tmp_path / "model")
    mx.model.save_checkpoint(prefix, 0, sym, arg_params, aux_params)
    pixels = mx.nd.array(rng.uniform(0, 255, BATCH))

    def embed(s, args, auxs):
        mod = mx.mod.Module(s, label_names=None)
        mod.bind(data_shapes=[("data", BATCH)], for_training=False)
        mod.set_params(args, auxs)
        mod.forward(mx.io.DataBatch([pixels]), is_train=False)
        return mod.get_outputs()[0].asnumpy()

    before = embed(sym, arg_params, aux_params)
    loaded_sym, loaded_args, loaded_aux = mx.model.load_checkpoint(prefix, 0)
    assert loaded_sym.list_outputs() == ["fc1_output"]
    np.testing.assert_array_equal(embed(loaded_sym, loaded_args, loaded_aux), before)
    block = mx.gluon.nn.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    np.testing.assert_allclose(block(pixels).asnumpy(), before, rtol=1e-6, atol=1e-6)


def test_prelu_and_prelu_conv_checkpoints_interchange():
    """The same trained parameters give the same embeddings through either PReLU form."""
    rng = np.random.default_rng(7)
    mod = mx.mod.Module(symbols.get_symbol("mbf"), label_names=None)
    mod.bind(data_shapes=[("data", BATCH)], for_training=False)
    mod.init_params(mx.init.Xavier())
    arg_params, aux_params = mod.get_params()
    for name, value in arg_params.items():      # slopes of both signs and sizes, not just the initial 0.25
        if name.endswith("_act_gamma"):
            value[:] = rng.uniform(-0.5, 1.5, value.shape)
    pixels = mx.io.DataBatch([mx.nd.array(rng.uniform(0, 255, BATCH))])
    outputs = []
    for act_type in ("prelu", "prelu_conv"):
        mod = mx.mod.Module(symbols.get_symbol("mbf", act_type=act_type), label_names=None)
        mod.bind(data_shapes=[("data", BATCH)], for_training=False)
        mod.set_params(arg_params, aux_params)
        mod.forward(pixels, is_train=False)
        outputs.append(mod.get_outputs()[0].asnumpy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4 * np.abs(outputs[0]).max())


@pytest.mark.parametrize("name", ["r18", "r100", "mbf"])
def test_fp16_graph_casts_the_trunk_and_returns_float32(name):
    """Build + shape / type inference only: CPU float16 convolution is not supported by every MXNet build."""
    sym = symbols.get_symbol(name, fp16=True)
    assert sym.infer_shape(data=BATCH)[1] == [(2, 512)]
    arg_types, out_types, _ = sym.infer_type(data="float32")
    types = dict(zip(sym.list_arguments(), arg_types))
    assert out_types == [np.float32] and types["data"] == np.float32
    assert types["stem_conv_weight"] == np.float16 and types["stem_act_gamma"] == np.float16
    assert types["pre_fc1_weight"] == np.float32 and types["fc1_beta"] == np.float32
    casts = [n for n in json.loads(sym.tojson())["nodes"] if n["op"] == "Cast"]
    assert [n["attrs"]["dtype"] for n in casts] == ["float16", "float32"]


# ---------------------------------------------------------------- options and errors

def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        symbols.get_symbol("r101")
    assert "'r101'" in str(err.value)
    for name in symbols.NETWORKS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs, fragment", [({"embedding_size": 0}, "embedding_size"),
                                              ({"embedding_size": 1.5}, "embedding_size"),
                                              ({"dropout": 1.0}, "dropout"),
                                              ({"act_type": "swish"}, "act_type")])
def test_bad_options_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        symbols.get_symbol("r18", **kwargs)


def layer_attrs(sym, name):
    return [n["attrs"] for n in json.loads(sym.tojson())["nodes"] if n["name"] == name][0]


def test_bn_options_and_dropout_reach_the_graph():
    # InsightFace's MXNet eps by default, in every BN of every backbone
    for name in symbols.NETWORKS:
        nodes = json.loads(symbols.get_symbol(name).tojson())["nodes"]
        assert {n["attrs"]["eps"] for n in nodes if n["op"] == "BatchNorm"} == {"2e-05"}, name
    sym = symbols.get_symbol("r18", bn_mom=0.8, bn_eps=1e-5, dropout=0.4)
    assert layer_attrs(sym, "stem_bn")["momentum"] == "0.8" and layer_attrs(sym, "stem_bn")["eps"] == "1e-05"
    assert layer_attrs(sym, "dropout")["p"] == "0.4"
    assert layer_attrs(sym, "fc1")["fix_gamma"] == "True"
    assert layer_attrs(symbols.get_symbol("mbf"), "fc1")["fix_gamma"] == "False"
    assert layer_attrs(symbols.get_symbol("r18", fix_gamma=False), "fc1")["fix_gamma"] == "False"
    assert "dropout" not in [n["name"] for n in json.loads(symbols.get_symbol("r18").tojson())["nodes"]]


def test_per_layer_bn_settings_width_and_bias():
    """What --pretrained takes from a checkpoint's graph: per-layer eps / fix_gamma, mbf's width, the FC bias."""
    sym = symbols.get_symbol("mbf", bn_layers={"stem_bn": {"eps": 1e-3}, "fc1": {"fix_gamma": True}})
    assert layer_attrs(sym, "stem_bn")["eps"] == "0.001" and layer_attrs(sym, "stem_dw_bn")["eps"] == "2e-05"
    assert layer_attrs(sym, "fc1")["fix_gamma"] == "True" and layer_attrs(sym, "gdc_bn")["fix_gamma"] == "False"
    narrow = arg_shapes(symbols.get_symbol("mbf", width_scale=1, fc_bias=True))
    assert narrow["stem_conv_weight"] == (64, 3, 3, 3) and narrow["res3_unit2_project_conv_weight"] == (128, 256, 1, 1)
    assert narrow["pre_fc1_bias"] == (512,) and "pre_fc1_bias" not in arg_shapes(symbols.get_symbol("mbf"))
    assert "pre_fc1_bias" not in arg_shapes(symbols.get_symbol("r18", fc_bias=False))
    # the numbers: an override of eps and fix_gamma computes what the NumPy BN says
    rng = np.random.default_rng(9)
    opt = common.Options(bn_layers={"b": {"eps": 0.5, "fix_gamma": True}})
    x = mx.sym.Variable("data")
    p = random_params(common.bn(x, "b", opt), (2, 3, 4, 4), rng)
    p["data"] = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_inference(common.bn(x, "b", opt), p), np_bn(p["data"], p, "b", 0.5, True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [({"bn_layers": {"nope": {"eps": 1e-3}}}, "no BatchNorm layer of r18"),
                                              ({"bn_layers": {"stem_bn": {"momentum": 0.5}}}, "unknown setting"),
                                              ({"width_scale": 1}, "width_scale is a MobileFaceNet"),
                                              ({"bn_eps": 0.0}, "bn_eps must be > 0")])
def test_bad_layer_options_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        symbols.get_symbol("r18", **kwargs)
    with pytest.raises(ValueError, match="width_scale must be a positive integer"):
        symbols.get_symbol("mbf", width_scale=0)


# ---------------------------------------------------------------- tools/count_flops.py

def test_mac_count_of_conv_and_fc_layers():
    data = mx.sym.Variable("data")
    x = mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), stride=(2, 2), pad=(1, 1), no_bias=True, name="c")
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), pad=(1, 1), num_group=4, no_bias=True, name="g")
    x = mx.sym.BatchNorm(x, name="bn")
    x = mx.sym.FullyConnected(x, num_hidden=10, name="fc")
    counts = count_flops.mac_count(x, (2, 3, 16, 16))
    assert counts["conv"] == 2 * (8 * 8 * 8 * 3 * 9 + 8 * 8 * 8 * 2 * 9)
    assert counts["fc"] == 2 * 10 * 8 * 8 * 8
    assert counts["elementwise"] == 2 * 8 * 8 * 8


def test_cost_table_covers_every_backbone():
    rows = count_flops.cost_table()
    assert [r[0] for r in rows] == list(symbols.NETWORKS)
    macs = {r[0]: r[3] + r[4] for r in rows}
    # deeper IResNets cost more; r100's ~12.1 GMACs is InsightFace's "24.2 GFLOPs" (2 FLOPs per MAC)
    assert macs["mbf"] < macs["r18"] < macs["r34"] < macs["r50"] < macs["r100"] < macs["r200"]
    assert 11.5e9 < macs["r100"] < 12.5e9
    assert len(count_flops.format_table(rows).splitlines()) == 2 + len(symbols.NETWORKS)


def test_throughput_measurement_runs():
    assert count_flops.measure_throughput("mbf", batch_size=2, iters=1, warmup=0, act_type="prelu_conv") > 0
