"""MXNet symbol backbones for face recognition: ``get_symbol(name, embedding_size=512, **options)``.

The symbol takes ``data`` (N, 3, 112, 112) raw RGB pixels 0..255, NCHW float32 (normalised inside the graph)
and has one output, ``fc1_output`` (N, embedding_size) float32, as InsightFace deployments expect.
"""
import numbers

from symbols.common import Options
from symbols.iresnet import STAGES, iresnet_symbol
from symbols.mobilefacenet import mobilefacenet_symbol

NETWORKS = ("r18", "r34", "r50", "r100", "r200", "mbf")
INPUT_SHAPE = (3, 112, 112)


def get_symbol(name, embedding_size=512, fp16=False, dropout=0.0, bn_mom=0.9, bn_eps=1e-5, act_type="prelu",
               fix_gamma=None):
    """The embedding symbol of backbone ``name`` (one of NETWORKS); its single output is ``fc1_output``.

    fp16: the trunk runs in float16 (for GPU training); the head and the output stay float32.
    dropout: dropout rate before the embedding FC (arcface_torch uses 0 for all its backbones).
    bn_mom / bn_eps: BatchNorm settings in MXNet's convention (momentum 0.9 == PyTorch's 0.1; eps 1e-5 as
    arcface_torch, legacy InsightFace MXNet used 2e-5).
    act_type: 'prelu' (the original, MXNet's LeakyReLU op), 'prelu_conv' (the same function and parameters
    built from depthwise 1x1 convolutions: 1.6-4x faster CPU training; checkpoints interchange with 'prelu')
    or 'relu'.
    fix_gamma: whether the last BN (``fc1``) keeps gamma fixed at 1; None follows the original
    (IResNet: fixed, MobileFaceNet: learnt).
    """
    if name not in NETWORKS:
        raise ValueError("unknown network %r; valid names: %s" % (name, ", ".join(NETWORKS)))
    if not isinstance(embedding_size, numbers.Integral) or isinstance(embedding_size, bool) or embedding_size < 1:
        raise ValueError("embedding_size must be a positive integer, got %r" % (embedding_size,))
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1), got %r" % (dropout,))
    opt = Options(bn_mom=bn_mom, bn_eps=bn_eps, act_type=act_type, fp16=fp16)
    if name == "mbf":
        return mobilefacenet_symbol(embedding_size, dropout, opt, fix_gamma=bool(fix_gamma))
    fixed = True if fix_gamma is None else bool(fix_gamma)
    return iresnet_symbol(name, embedding_size, dropout, opt, fix_gamma=fixed)
