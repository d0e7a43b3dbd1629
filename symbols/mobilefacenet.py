"""MobileFaceNet (arcface_torch's default variant: width scale 2, blocks (1, 4, 6, 2), GDC head).

Width scale 1 with a biased embedding FC and fc1's gamma fixed is InsightFace's MXNet MobileFaceNet
(fmobilefacenet, 'GDC' output), the layout of its released models.

Stride-2 stem, grouped/depthwise bottlenecks (1x1 expand -> depthwise 3x3 -> 1x1 linear projection, with an
identity shortcut in the residual stacks), a 1x1 conv to 512 channels, then the global depthwise (GDC) head:
depthwise 7x7 -> BN -> flatten -> FC(no bias) -> BN, output named fc1. 2.06 M parameters at 512-d.
"""
import mxnet as mx

from symbols.common import bn, conv, conv_bn, normalized_input, to_float32

WIDTH_SCALE = 2                 # arcface_torch's default (non-large) variant; InsightFace's MXNet one is 1
RESIDUAL_UNITS = (4, 6, 2)      # its blocks (1, 4, 6, 2): the leading 1 is the single grouped conv after the stem


def _depthwise(x, name, out_channels, groups, stride, opt, residual=False):
    """Bottleneck: 1x1 expand to `groups` channels -> depthwise 3x3 -> linear 1x1 projection (+ identity)."""
    y = conv_bn(x, name + "_expand", groups, opt, kernel=1, pad=0)
    y = conv_bn(y, name + "_dw", groups, opt, kernel=3, stride=stride, groups=groups)
    y = conv_bn(y, name + "_project", out_channels, opt, kernel=1, pad=0, activate=False)
    return y + x if residual else y


def _residual(x, name, channels, units, groups, opt):
    """`units` stride-1 bottlenecks with identity shortcuts."""
    for i in range(units):
        x = _depthwise(x, "%s_unit%d" % (name, i + 1), channels, groups, 1, opt, residual=True)
    return x


def mobilefacenet_symbol(embedding_size, dropout, opt, fix_gamma=False, width_scale=WIDTH_SCALE, fc_bias=False):
    """The MobileFaceNet embedding symbol (output fc1); fp16 covers the stem and bottlenecks, as the original.
    width_scale multiplies the stem and bottleneck outputs (64, 128 channels at 1); the expansions stay."""
    narrow, wide = 64 * width_scale, 128 * width_scale                             # 128, 256 channels at 2
    x = normalized_input(opt)
    x = conv_bn(x, "stem", narrow, opt, kernel=3, stride=2)                        # 56x56
    x = conv_bn(x, "stem_dw", narrow, opt, kernel=3, stride=1, groups=64)          # the single first "block"
    x = _depthwise(x, "dw1", narrow, 128, 2, opt)                                  # 28x28
    x = _residual(x, "res1", narrow, RESIDUAL_UNITS[0], 128, opt)
    x = _depthwise(x, "dw2", wide, 256, 2, opt)                                    # 14x14
    x = _residual(x, "res2", wide, RESIDUAL_UNITS[1], 256, opt)
    x = _depthwise(x, "dw3", wide, 512, 2, opt)                                    # 7x7
    x = _residual(x, "res3", wide, RESIDUAL_UNITS[2], 256, opt)
    x = to_float32(x, opt)
    x = conv_bn(x, "conv_sep", 512, opt, kernel=1, pad=0)
    x = conv(x, "gdc_conv", 512, kernel=7, pad=0, groups=512)                      # 1x1, global depthwise
    # BN over (N, 512) after the flatten: the same numbers as over (N, 512, 1, 1), but MXNet 1.9.1's oneDNN
    # BatchNorm on the 1x1 map segfaults the next BN when a training-bound executor runs an inference forward
    x = bn(mx.sym.flatten(x), "gdc_bn", opt)
    if dropout > 0:
        x = mx.sym.Dropout(x, p=dropout, name="dropout")
    x = mx.sym.FullyConnected(x, num_hidden=embedding_size, no_bias=not fc_bias, name="pre_fc1")
    return bn(x, "fc1", opt, fix_gamma=fix_gamma)
