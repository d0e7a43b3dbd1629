"""Starting the backbone from a legacy checkpoint (``--pretrained PREFIX,EPOCH``): this project's exports or
InsightFace's released MXNet models, whose parameter names differ in places.

Each parameter of ``PREFIX-EPOCH.params`` is matched to the backbone by name and shape: under its own name, else
under the name this project gives the layer InsightFace's symbols call differently (``insightface_to_ours``:
fresnet's IResNet, fmobilefacenet's MobileFaceNet). The classifier (``fc7*``) is never taken: the head starts
fresh or from ``--pretrained-head``. What does not fit (backbone parameters the checkpoint lacks, checkpoint
parameters with no place in the backbone, shapes that differ) is listed in one error, or in a warning with
``--pretrained-partial`` (the backbone keeps its initial values there).
"""
import json
import logging
import os
import re

import mxnet as mx

from recognition import checkpoint_io, dist

log = logging.getLogger("recognition.train")

CLASSIFIER_PREFIX = "fc7"      # InsightFace's softmax / margin classifier: never part of the backbone
_LISTED = 12                   # names shown per kind in a report (the count is always complete)

# InsightFace fresnet (IResNet "E", unit v3) -> this project's symbols/iresnet.py
_IRESNET_RULES = [(re.compile(p), r) for p, r in (
    (r"^conv0_", "stem_conv_"), (r"^bn0_", "stem_bn_"), (r"^relu0_", "stem_act_"),
    (r"^(stage\d+_unit\d+)_relu1_", r"\1_act_"), (r"^(stage\d+_unit\d+)_conv1sc_", r"\1_down_conv_"),
    (r"^(stage\d+_unit\d+)_sc_", r"\1_down_bn_"), (r"^bn1_", "bn_head_"))]
# InsightFace fmobilefacenet: <block>[_conv_sep|_conv_dw|_conv_proj]_<conv2d|batchnorm|relu>_<param>
_MBF_NAME = re.compile(r"^(?P<block>conv_1|conv_2_dw|dconv_(?:23|34|45)|res_[345]_block\d+|conv_6sep|conv_6dw7_7)"
                       r"(?P<part>_conv_sep|_conv_dw|_conv_proj)?_(?P<layer>conv2d|batchnorm|relu)_(?P<param>\w+)$")
_MBF_BLOCKS = {"conv_1": "stem", "conv_2_dw": "stem_dw", "dconv_23": "dw1", "dconv_34": "dw2", "dconv_45": "dw3",
               "res_3": "res1", "res_4": "res2", "res_5": "res3", "conv_6sep": "conv_sep", "conv_6dw7_7": "gdc"}
_MBF_PARTS = {None: "", "_conv_sep": "_expand", "_conv_dw": "_dw", "_conv_proj": "_project"}
_MBF_LAYERS = {"conv2d": "conv", "batchnorm": "bn", "relu": "act"}


def insightface_to_ours(name):
    """This project's name for the layer parameter InsightFace's MXNet symbols call ``name`` (None: no rule)."""
    for pattern, replacement in _IRESNET_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    found = _MBF_NAME.match(name)
    if not found:
        return None
    block = found["block"]
    unit = re.match(r"^(res_\d)_block(\d+)$", block)
    block = "%s_unit%d" % (_MBF_BLOCKS[unit[1]], int(unit[2]) + 1) if unit else _MBF_BLOCKS[block]
    return "%s%s_%s_%s" % (block, _MBF_PARTS[found["part"]], _MBF_LAYERS[found["layer"]], found["param"])


def read_params(spec):
    """{name: NDArray} of checkpoint 'PREFIX,EPOCH' (the 'arg:' / 'aux:' prefixes dropped); errors name the file."""
    from eval.embedding import parse_model_spec
    try:
        prefix, epoch = parse_model_spec(spec)
    except ValueError as err:
        raise ValueError("--pretrained: %s" % err) from None
    path = "%s-%04d.params" % (prefix, epoch)
    if not os.path.isfile(path):
        raise FileNotFoundError("--pretrained %s: parameter file %s not found" % (spec, path))
    try:
        saved = mx.nd.load(path)
    except mx.base.MXNetError as err:
        raise ValueError("--pretrained %s: %s is not an MXNet parameter file (%s)"
                         % (spec, path, str(err).strip().splitlines()[0])) from None
    params = {}
    for key, value in (saved.items() if isinstance(saved, dict) else []):
        kind, _, name = key.partition(":")
        if kind not in ("arg", "aux") or not name:
            raise ValueError("--pretrained %s: key %r of %s has no arg:/aux: prefix (not a legacy checkpoint)"
                             % (spec, key, path))
        if name in params:
            raise ValueError("--pretrained %s: %s holds %s both as arg: and aux:" % (spec, path, name))
        params[name] = value
    if not params:
        raise ValueError("--pretrained %s: %s holds no named parameters" % (spec, path))
    return params


class Match:
    """How a checkpoint's parameters line up with a backbone's: ``sources`` {backbone name: checkpoint name} of
    the parameters that fit, and the lists of what does not (see ``describe``)."""

    def __init__(self, checkpoint_shapes, backbone_shapes):
        self.sources, self.renamed, self.mismatched, self.unexpected, self.classifier = {}, 0, [], [], []
        claimed = {}
        for name in sorted(checkpoint_shapes):
            if name.startswith(CLASSIFIER_PREFIX):
                self.classifier.append(name)
                continue
            target = name if name in backbone_shapes else insightface_to_ours(name)
            if target not in backbone_shapes:
                self.unexpected.append(name)
            elif target in claimed:     # two checkpoint names for one layer: neither is trusted
                raise ValueError("checkpoint parameters %s and %s both map to the backbone's %s"
                                 % (claimed[target], name, target))
            else:
                claimed[target] = name
                if tuple(checkpoint_shapes[name]) != tuple(backbone_shapes[target]):
                    self.mismatched.append((target, name))
                else:
                    self.sources[target] = name
                    self.renamed += target != name
        self.missing = sorted(set(backbone_shapes) - set(claimed))
        self._shapes = (checkpoint_shapes, backbone_shapes)

    @property
    def complete(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self):
        """One line per kind of misfit, each naming the parameters with their shapes."""
        checkpoint, backbone = self._shapes
        kinds = [
            ("backbone parameter(s) missing from the checkpoint",
             ["%s %s" % (n, _shape(backbone[n])) for n in self.missing]),
            ("checkpoint parameter(s) with no place in the backbone",
             ["%s %s" % (n, _shape(checkpoint[n])) for n in self.unexpected]),
            ("shape mismatch(es), backbone vs checkpoint",
             ["%s %s vs %s%s" % (t, _shape(backbone[t]), "" if s == t else s + " ", _shape(checkpoint[s]))
              for t, s in self.mismatched])]
        lines = []
        for title, items in kinds:
            if items:
                more = len(items) - _LISTED
                lines.append("  %d %s: %s%s" % (len(items), title, ", ".join(items[:_LISTED]),
                                                 ", ... (%d more)" % more if more > 0 else ""))
        return "\n".join(lines)


def _shape(shape):
    return "(%s)" % ", ".join(str(int(d)) for d in shape)


def load_pretrained(spec, arg_params, aux_params, partial=False, network=""):
    """Copy checkpoint 'PREFIX,EPOCH' into the backbone's ``arg_params`` / ``aux_params`` (dicts of NDArrays,
    filled in place) and return the ``Match``. A misfit raises ValueError listing it, or with ``partial`` is
    logged as a warning (on rank 0) and the rest is loaded; nothing fitting at all is an error either way."""
    params = read_params(spec)
    targets = {**arg_params, **aux_params}
    header = "--pretrained %s does not fit the backbone%s" % (spec, " " + network if network else "")
    try:
        match = Match({k: v.shape for k, v in params.items()}, {k: v.shape for k, v in targets.items()})
    except ValueError as err:
        raise ValueError("%s: %s" % (header, err)) from None
    if not match.sources:
        raise ValueError("%s: none of its %d parameters fit\n%s" % (header, len(params), match.describe()))
    if not match.complete:
        if not partial:
            raise ValueError("%s:\n%s\ncheck --network / --act-type / --embedding-size against the checkpoint, or "
                             "pass --pretrained-partial to load what fits (the rest keeps its initial values)"
                             % (header, match.describe()))
        if dist.rank() == 0:
            log.warning("%s; --pretrained-partial: loading the %d parameter(s) that fit, the rest keeps its "
                        "initial values:\n%s", header, len(match.sources), match.describe())
    for target, source in match.sources.items():
        destination = targets[target]
        destination[:] = params[source].astype(destination.dtype)
    if dist.rank() == 0:
        log.info("--pretrained %s: %d of %d backbone parameters loaded (%d under InsightFace names)%s", spec,
                 len(match.sources), len(targets), match.renamed,
                 "; classifier %s not taken" % ", ".join(match.classifier) if match.classifier else "")
    return match


def head_checkpoint(folder, cfg):
    """The checkpoint folder (``checkpoints/step_*``) ``--pretrained-head`` names, checked to be complete and to
    hold a head of this run's method, classes and embedding size; a run's ``checkpoints`` folder stands for its
    newest complete checkpoint."""
    if not os.path.isfile(os.path.join(folder, "state.json")):
        newest = checkpoint_io.latest_complete(folder, "step_*")
        if newest is None:
            raise FileNotFoundError("--pretrained-head %s: not a checkpoint folder (no state.json) and holds no "
                                    "complete step_* checkpoint" % folder)
        folder = newest
    if not os.path.isfile(os.path.join(folder, checkpoint_io.COMPLETE)):
        raise ValueError("--pretrained-head %s: the checkpoint is incomplete (no %s marker)"
                         % (folder, checkpoint_io.COMPLETE))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    state.setdefault("method", "pfc")        # checkpoints written before FFC existed
    for key in ("method", "num_classes", "embedding_size"):
        if state.get(key) != cfg[key]:
            raise ValueError("--pretrained-head %s: the checkpoint has %s=%r, this run %r"
                             % (folder, key, state.get(key), cfg[key]))
    return folder
