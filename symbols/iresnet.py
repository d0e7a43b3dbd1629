"""IResNet (the "IR" ResNet of ArcFace / arcface_torch): r18, r34, r50, r100, r200.

Stem conv3x3(64) + BN + PReLU at 112x112; four stages of improved residual blocks
(BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a conv1x1 + BN shortcut where the shape changes),
each stage halving the resolution (112 -> 7); then the "E" head.
"""
from symbols.common import act, bn, conv, embedding_head_e, normalized_input

STAGES = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
          "r200": (6, 26, 60, 6)}
WIDTHS = (64, 128, 256, 512)


def _block(x, name, channels, stride, shortcut_conv, opt):
    """The IR residual unit; shortcut_conv adds the conv1x1(stride) + BN projection on the identity path."""
    body = bn(x, name + "_bn1", opt)
    body = conv(body, name + "_conv1", channels, 3, 1)
    body = bn(body, name + "_bn2", opt)
    body = act(body, name + "_act", channels, opt)
    body = conv(body, name + "_conv2", channels, 3, stride)
    body = bn(body, name + "_bn3", opt)
    if shortcut_conv:
        x = bn(conv(x, name + "_down_conv", channels, 1, stride, pad=0), name + "_down_bn", opt)
    return body + x


def iresnet_symbol(depth_name, embedding_size, dropout, opt, fix_gamma=True, fc_bias=True):
    """The IResNet embedding symbol for depth_name in STAGES (output fc1)."""
    x = normalized_input(opt)
    x = act(bn(conv(x, "stem_conv", 64, 3, 1), "stem_bn", opt), "stem_act", 64, opt)
    for stage, (units, width) in enumerate(zip(STAGES[depth_name], WIDTHS)):
        for unit in range(units):
            first = unit == 0       # every stage opens with stride 2, so its first unit needs the projection
            x = _block(x, "stage%d_unit%d" % (stage + 1, unit + 1), width, 2 if first else 1, first, opt)
    return embedding_head_e(x, embedding_size, dropout, opt, fix_gamma, fc_bias)
