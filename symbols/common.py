"""Building blocks shared by the backbones: in-graph input normalisation, conv + BN + PReLU, the heads."""
import mxnet as mx

INPUT_MEAN, INPUT_SCALE = 127.5, 0.0078125      # raw RGB 0..255 -> [-1, 1), inside the graph
PRELU_INIT = 0.25                                # PyTorch's PReLU default (MXNet's would give a "gamma" 1)
ACT_TYPES = ("prelu", "prelu_conv", "relu")
BN_EPS = 2e-5                                    # InsightFace's MXNet backbones (fresnet, symbol_utils' heads)
BN_LAYER_KEYS = ("eps", "fix_gamma")


class Options:
    """Settings every block reads: BN momentum / eps, activation, fp16, and per-layer BN settings.

    bn_layers: {BN layer name: {"eps": float, "fix_gamma": bool}} overriding ``bn_eps`` / the block's fix_gamma
    for those layers (how ``--pretrained`` rebuilds a network exactly as a checkpoint's graph has it)."""

    def __init__(self, bn_mom=0.9, bn_eps=BN_EPS, act_type="prelu", fp16=False, bn_layers=None):
        if act_type not in ACT_TYPES:
            raise ValueError("act_type must be one of %s, got %r" % (", ".join(ACT_TYPES), act_type))
        if not bn_eps > 0:
            raise ValueError("bn_eps must be > 0, got %r" % (bn_eps,))
        self.bn_mom, self.bn_eps, self.act_type, self.fp16 = bn_mom, bn_eps, act_type, fp16
        self.bn_layers = dict(bn_layers or {})
        for name, settings in self.bn_layers.items():
            unknown = set(settings) - set(BN_LAYER_KEYS)
            if unknown:
                raise ValueError("bn_layers[%r]: unknown setting(s) %s (known: %s)"
                                 % (name, ", ".join(sorted(unknown)), ", ".join(BN_LAYER_KEYS)))


def normalized_input(opt):
    """The 'data' variable (N, 3, 112, 112) raw RGB, normalised in the graph (cast to fp16 if asked)."""
    data = mx.sym.Variable("data")
    body = (data - INPUT_MEAN) * INPUT_SCALE
    return mx.sym.Cast(body, dtype="float16") if opt.fp16 else body


def bn(x, name, opt, fix_gamma=False):
    """BatchNorm with the backbone's momentum / eps (gamma learnt unless fix_gamma); ``opt.bn_layers[name]``
    overrides eps / fix_gamma of this layer."""
    layer = opt.bn_layers.get(name, {})
    return mx.sym.BatchNorm(x, fix_gamma=bool(layer.get("fix_gamma", fix_gamma)), eps=float(layer.get(
        "eps", opt.bn_eps)), momentum=opt.bn_mom, name=name)


def act(x, name, channels, opt):
    """The backbone's activation on `channels` channels: per-channel PReLU (slopes start at 0.25) or ReLU.

    'prelu' is MXNet's LeakyReLU op. 'prelu_conv' computes the same function, with the same parameter
    (`<name>_gamma`, shape (channels,)), as g*x + (1-g)*relu(x) with two depthwise 1x1 convolutions: MXNet's
    CPU PReLU backward is slow and oneDNN's convolutions are not: CPU training runs 1.6x (r18) to 4x (mbf)
    faster (docs/backbones.md).
    """
    if opt.act_type == "relu":
        return mx.sym.Activation(x, act_type="relu", name=name)
    if opt.act_type == "prelu":
        gamma = mx.sym.Variable(name + "_gamma", init=mx.init.Constant(PRELU_INIT))
        return mx.sym.LeakyReLU(x, gamma=gamma, act_type="prelu", name=name)
    gamma = mx.sym.Variable(name + "_gamma", shape=(channels,), init=mx.init.Constant(PRELU_INIT))
    slope = mx.sym.reshape(gamma, shape=(channels, 1, 1, 1), name=name + "_slope")

    def per_channel_scale(t, weight, suffix):
        return mx.sym.Convolution(t, weight=weight, num_filter=channels, num_group=channels, kernel=(1, 1),
                                  no_bias=True, name=name + suffix)
    positive = mx.sym.Activation(x, act_type="relu", name=name + "_relu")
    return per_channel_scale(x, slope, "_linear") + per_channel_scale(positive, 1.0 - slope, "_positive")


def conv(x, name, channels, kernel=3, stride=1, pad=None, groups=1):
    """Square bias-free convolution, 'same' padding unless pad is given."""
    pad = kernel // 2 if pad is None else pad
    return mx.sym.Convolution(x, num_filter=channels, kernel=(kernel, kernel), stride=(stride, stride),
                              pad=(pad, pad), num_group=groups, no_bias=True, name=name)


def conv_bn(x, name, channels, opt, kernel=3, stride=1, pad=None, groups=1, activate=True):
    """Conv (no bias) -> BN -> PReLU (ConvBlock) or without the activation (LinearBlock)."""
    x = bn(conv(x, name + "_conv", channels, kernel, stride, pad, groups), name + "_bn", opt)
    return act(x, name + "_act", channels, opt) if activate else x


def to_float32(x, opt):
    """Back to float32 where an fp16 trunk hands over to the head."""
    return mx.sym.Cast(x, dtype="float32") if opt.fp16 else x


def embedding_head_e(x, embedding_size, dropout, opt, fix_gamma=True, fc_bias=True):
    """InsightFace's "E" head: BN -> Dropout -> FC(embedding_size) -> BN (gamma fixed at 1), output fc1.

    The trunk's BN and dropout run in the trunk's dtype; the FC and the last BN in float32.
    """
    x = bn(x, "bn_head", opt)
    if dropout > 0:
        x = mx.sym.Dropout(x, p=dropout, name="dropout")
    x = to_float32(x, opt)
    x = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=embedding_size, no_bias=not fc_bias, name="pre_fc1")
    return bn(x, "fc1", opt, fix_gamma=fix_gamma)
