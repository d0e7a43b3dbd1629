"""InsightFace's own MXNet graph layouts, rebuilt for the tests: checkpoints as its released models are.

Written for this project from a study of InsightFace's public ``recognition/symbol/fresnet.py``,
``fmobilefacenet.py`` and ``symbol_utils.py``; what matters to a loader is reproduced: the unit structure, every
layer name, the graph attributes (BatchNorm eps / fix_gamma / momentum, convolution workspace) and the in-graph
input scaling.

- ``fresnet(num_layers)``: the IResNet of the released r50 / r100 models, fresnet with ``version_unit=3``
  (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus conv1x1 + BN where the shape changes),
  ``version_input=1`` (identity ``id``, ``data - 127.5``, ``* 0.0078125``, conv3x3(64) stride 1 + BN + PReLU),
  ``version_output='E'`` (BN ``bn1`` -> Dropout 0.4 -> FC ``pre_fc1`` -> BN ``fc1`` with gamma fixed), no SE;
  every BatchNorm eps 2e-5.
- ``fmobilefacenet()``: fmobilefacenet with the ``GDC`` output. Its blocks write no eps, so MXNet's default 1e-3
  holds everywhere but in ``fc1`` (2e-5, gamma fixed); 64-channel stem, biased ``pre_fc1``.
- ``with_softmax``: the training graph a checkpoint saved without ``ckpt_embedding`` holds (fc7 + softmax).
"""
import mxnet as mx
import numpy as np

UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
FILTERS = (64, 64, 128, 256, 512)
FRESNET_EPS = 2e-5
WORKSPACE = 256


# --------------------------------------------------------------------------------------------- fresnet
def _fresnet_bn(x, name, bn_mom, fix_gamma=False):
    return mx.sym.BatchNorm(data=x, fix_gamma=fix_gamma, eps=FRESNET_EPS, momentum=bn_mom, name=name)


def _fresnet_conv(x, name, channels, kernel, stride, pad):
    return mx.sym.Convolution(data=x, num_filter=channels, kernel=(kernel, kernel), stride=(stride, stride),
                              pad=(pad, pad), no_bias=True, workspace=WORKSPACE, name=name)


def _act(x, name, act_type="prelu"):
    """fresnet's Act: MXNet's PReLU (LeakyReLU op) for 'prelu', else Activation(act_type)."""
    if act_type == "prelu":
        return mx.sym.LeakyReLU(data=x, act_type="prelu", name=name)
    return mx.sym.Activation(data=x, act_type=act_type, name=name)


def _unit_v3(x, channels, stride, dim_match, name, bn_mom, act_type):
    body = _fresnet_bn(x, name + "_bn1", bn_mom)
    body = _fresnet_conv(body, name + "_conv1", channels, 3, 1, 1)
    body = _act(_fresnet_bn(body, name + "_bn2", bn_mom), name + "_relu1", act_type)
    body = _fresnet_bn(_fresnet_conv(body, name + "_conv2", channels, 3, stride, 1), name + "_bn3", bn_mom)
    if dim_match:
        shortcut = x
    else:   # fresnet gives the projection no pad: the default (0, 0)
        projection = mx.sym.Convolution(data=x, num_filter=channels, kernel=(1, 1), stride=(stride, stride),
                                        no_bias=True, workspace=WORKSPACE, name=name + "_conv1sc")
        shortcut = _fresnet_bn(projection, name + "_sc", bn_mom)
    return body + shortcut


def fresnet(num_layers=50, embedding_size=512, bn_mom=0.9, act_type="prelu"):
    """fresnet's embedding graph (output ``fc1``) for ``num_layers`` in UNITS, as the released IResNets
    (``act_type``: fresnet's ``net_act``)."""
    data = mx.sym.identity(data=mx.sym.Variable("data"), name="id")
    data = (data - 127.5) * 0.0078125
    body = _fresnet_conv(data, "conv0", FILTERS[0], 3, 1, 1)
    body = _act(_fresnet_bn(body, "bn0", bn_mom), "relu0", act_type)
    for stage, units in enumerate(UNITS[num_layers]):
        channels = FILTERS[stage + 1]
        body = _unit_v3(body, channels, 2, False, "stage%d_unit1" % (stage + 1), bn_mom, act_type)
        for unit in range(2, units + 1):
            body = _unit_v3(body, channels, 1, True, "stage%d_unit%d" % (stage + 1, unit), bn_mom, act_type)
    body = mx.sym.Dropout(data=_fresnet_bn(body, "bn1", bn_mom), p=0.4)     # symbol_utils.get_fc1, type 'E'
    fc1 = mx.sym.FullyConnected(data=body, num_hidden=embedding_size, name="pre_fc1")
    return _fresnet_bn(fc1, "fc1", bn_mom, fix_gamma=True)


# --------------------------------------------------------------------------------------- fmobilefacenet
def _mbf_conv(x, name, channels, kernel=1, stride=1, pad=0, groups=1, bn_mom=0.9, activate=True):
    """fmobilefacenet's Conv (conv2d -> batchnorm -> relu) or, without ``activate``, its Linear; the BN writes no
    eps (MXNet's default 1e-3)."""
    x = mx.sym.Convolution(data=x, num_filter=channels, kernel=(kernel, kernel), num_group=groups,
                           stride=(stride, stride), pad=(pad, pad), no_bias=True, name=name + "_conv2d")
    x = mx.sym.BatchNorm(data=x, name=name + "_batchnorm", fix_gamma=False, momentum=bn_mom)
    return _act(x, name + "_relu") if activate else x


def _d_residual(x, name, out_channels, groups, stride, bn_mom):
    x = _mbf_conv(x, name + "_conv_sep", groups, bn_mom=bn_mom)
    x = _mbf_conv(x, name + "_conv_dw", groups, 3, stride, 1, groups, bn_mom)
    return _mbf_conv(x, name + "_conv_proj", out_channels, bn_mom=bn_mom, activate=False)


def _residual(x, name, blocks, channels, groups, bn_mom):
    for i in range(blocks):
        x = _d_residual(x, "%s_block%d" % (name, i), channels, groups, 1, bn_mom) + x
    return x


def fmobilefacenet(embedding_size=512, bn_mom=0.9):
    """fmobilefacenet's embedding graph with the GDC output (output ``fc1``), as the released MobileFaceNet."""
    data = (mx.sym.Variable("data") - 127.5) * 0.0078125
    x = _mbf_conv(data, "conv_1", 64, 3, 2, 1, bn_mom=bn_mom)
    x = _mbf_conv(x, "conv_2_dw", 64, 3, 1, 1, 64, bn_mom)
    x = _d_residual(x, "dconv_23", 64, 128, 2, bn_mom)
    x = _residual(x, "res_3", 4, 64, 128, bn_mom)
    x = _d_residual(x, "dconv_34", 128, 256, 2, bn_mom)
    x = _residual(x, "res_4", 6, 128, 256, bn_mom)
    x = _d_residual(x, "dconv_45", 128, 512, 2, bn_mom)
    x = _residual(x, "res_5", 2, 128, 256, bn_mom)
    x = _mbf_conv(x, "conv_6sep", 512, bn_mom=bn_mom)
    x = _mbf_conv(x, "conv_6dw7_7", 512, 7, 1, 0, 512, bn_mom, activate=False)      # symbol_utils' GDC
    x = mx.sym.FullyConnected(data=x, num_hidden=embedding_size, name="pre_fc1")
    return mx.sym.BatchNorm(data=x, fix_gamma=True, eps=2e-5, momentum=bn_mom, name="fc1")


def with_softmax(embedding, num_classes):
    """The training graph around ``embedding``: its output blocked from gradients, and a softmax classifier."""
    fc7 = mx.sym.FullyConnected(data=embedding, weight=mx.sym.Variable("fc7_weight"), no_bias=True,
                                num_hidden=num_classes, name="fc7")
    softmax = mx.sym.SoftmaxOutput(data=fc7, label=mx.sym.Variable("softmax_label"), name="softmax",
                                   normalization="valid")
    return mx.sym.Group([mx.sym.BlockGrad(embedding), softmax])


# ------------------------------------------------------------------------------------------- checkpoints
def trained_like(build, seed=0, batch=4):
    """(arg_params, aux_params) for the graph ``build(bn_mom)``: He-scaled weights, BN gammas in [0.5, 1.5] (the
    fixed ones too: a loader must not use them), non-zero betas and biases, PReLU slopes in [0.05, 0.45], and
    moving statistics from one training-mode pass at momentum 0 on random faces, perturbed (so every layer
    keeps a sane scale and the statistics are not the batch's own)."""
    rng = np.random.default_rng(seed)
    symbol = build(0.9)
    shape = (batch, 3, 112, 112)
    arg_shapes, _, aux_shapes = symbol.infer_shape(data=shape)
    arg = {}
    for name, arg_shape in zip(symbol.list_arguments(), arg_shapes):
        if name == "data":
            continue
        if name.endswith("_weight"):
            value = rng.standard_normal(arg_shape) * np.sqrt(2.0 / np.prod(arg_shape[1:]))
        elif name.endswith("_gamma"):
            value = rng.uniform(0.05, 0.45, arg_shape) if "relu" in name else rng.uniform(0.5, 1.5, arg_shape)
        else:
            value = rng.normal(0, 0.2, arg_shape)
        arg[name] = mx.nd.array(value, dtype=np.float32)
    aux = {name: mx.nd.array(np.full(s, 1.0 if name.endswith("_var") else 0.0, np.float32))
           for name, s in zip(symbol.list_auxiliary_states(), aux_shapes)}
    calibrating = mx.mod.Module(build(0.0), data_names=["data"], label_names=None)
    calibrating.bind(data_shapes=[("data", shape)], for_training=True, grad_req="null")
    calibrating.set_params(arg, aux)
    calibrating.forward(mx.io.DataBatch([mx.nd.array(rng.uniform(0, 255, shape))]), is_train=True)
    mx.nd.waitall()
    _, stats = calibrating.get_params()
    for name, value in stats.items():
        value = value.asnumpy().astype(np.float64)
        if name.endswith("_var"):
            value = np.maximum(value, 1e-3) * rng.uniform(0.7, 1.4, value.shape)
        else:
            value = value + rng.normal(0, 0.1, value.shape) * np.sqrt(np.maximum(
                stats[name[:-len("mean")] + "var"].asnumpy(), 1e-3))
        aux[name] = mx.nd.array(value.astype(np.float32))
    return arg, aux


def save(prefix, epoch, symbol, arg, aux):
    """``PREFIX-symbol.json`` + ``PREFIX-%04d.params``, as InsightFace's training saves them."""
    mx.model.save_checkpoint(prefix, epoch, symbol, arg, aux)
    return "%s,%d" % (prefix, epoch)
