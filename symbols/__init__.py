"""MXNet symbol backbones for face recognition: ``get_symbol(name, embedding_size=512, **options)``.

The symbol takes ``data`` (N, 3, 112, 112) raw RGB pixels 0..255, NCHW float32 (normalised inside the graph)
and has one output, ``fc1_output`` (N, embedding_size) float32, as InsightFace deployments expect.
"""
import json
import numbers

from symbols import mobilefacenet
from symbols.common import BN_EPS, Options
from symbols.iresnet import iresnet_symbol

NETWORKS = ("r18", "r34", "r50", "r100", "r200", "mbf")
INPUT_SHAPE = (3, 112, 112)


def get_symbol(name, embedding_size=512, fp16=False, dropout=0.0, bn_mom=0.9, bn_eps=BN_EPS, act_type="prelu",
               fix_gamma=None, width_scale=None, fc_bias=None, bn_layers=None):
    """The embedding symbol of backbone ``name`` (one of NETWORKS); its single output is ``fc1_output``.

    fp16: the trunk runs in float16 (for GPU training); the head and the output stay float32.
    dropout: dropout rate before the embedding FC (arcface_torch uses 0 for all its backbones).
    bn_mom / bn_eps: BatchNorm settings in MXNet's convention (momentum 0.9 == PyTorch's 0.1; eps 2e-5 as
    InsightFace's MXNet fresnet, arcface_torch's PyTorch models use 1e-5).
    act_type: 'prelu' (the original, MXNet's LeakyReLU op), 'prelu_conv' (the same function and parameters
    built from depthwise 1x1 convolutions: 1.6-4x faster CPU training; checkpoints interchange with 'prelu')
    or 'relu'.
    fix_gamma: whether the last BN (``fc1``) keeps gamma fixed at 1; None follows the original
    (IResNet: fixed, MobileFaceNet: learnt).
    width_scale: ``mbf`` only, channel multiplier of the stem and bottleneck outputs; None is arcface_torch's 2,
    1 is InsightFace's MXNet MobileFaceNet.
    fc_bias: whether the embedding FC ``pre_fc1`` has a bias; None follows the original (IResNet: yes,
    MobileFaceNet: no; InsightFace's MXNet MobileFaceNet has one).
    bn_layers: {BN layer name: {"eps": ..., "fix_gamma": ...}}, per-layer overrides of the two above (every
    name must be a BN layer of the network).
    """
    if name not in NETWORKS:
        raise ValueError("unknown network %r; valid names: %s" % (name, ", ".join(NETWORKS)))
    if not isinstance(embedding_size, numbers.Integral) or isinstance(embedding_size, bool) or embedding_size < 1:
        raise ValueError("embedding_size must be a positive integer, got %r" % (embedding_size,))
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1), got %r" % (dropout,))
    opt = Options(bn_mom=bn_mom, bn_eps=bn_eps, act_type=act_type, fp16=fp16, bn_layers=bn_layers)
    if name == "mbf":
        scale = mobilefacenet.WIDTH_SCALE if width_scale is None else width_scale
        if not isinstance(scale, numbers.Integral) or isinstance(scale, bool) or scale < 1:
            raise ValueError("width_scale must be a positive integer, got %r" % (width_scale,))
        symbol = mobilefacenet.mobilefacenet_symbol(embedding_size, dropout, opt, fix_gamma=bool(fix_gamma),
                                                    width_scale=int(scale), fc_bias=bool(fc_bias))
    else:
        if width_scale is not None:
            raise ValueError("width_scale is a MobileFaceNet ('mbf') option, not one of %s" % name)
        fixed = True if fix_gamma is None else bool(fix_gamma)
        symbol = iresnet_symbol(name, embedding_size, dropout, opt, fix_gamma=fixed,
                                fc_bias=True if fc_bias is None else bool(fc_bias))
    unknown = sorted(set(opt.bn_layers) - set(bn_layer_names(symbol))) if opt.bn_layers else []
    if unknown:
        raise ValueError("bn_layers names no BatchNorm layer of %s: %s" % (name, ", ".join(unknown)))
    return symbol


def bn_layer_names(symbol):
    """Names of the BatchNorm layers of ``symbol``, in graph order."""
    return [node["name"] for node in json.loads(symbol.tojson())["nodes"] if node["op"] == "BatchNorm"]
