"""What a ``--pretrained`` checkpoint's own graph (``PREFIX-symbol.json``) says, so that fine-tuning starts from
exactly the network in the file.

Parameters are not the whole network: BatchNorm's eps and fix_gamma, the activation, the embedding FC's bias and
MobileFaceNet's width are graph attributes. ``follow_graph`` reads them from the file's graph (under this
project's layer names, ``pretrained.insightface_to_ours``) and returns the ``symbols.get_symbol`` options that
rebuild the backbone as the file has it where it differs from the config. ``check_against_file`` then runs the
file's own graph and the built backbone on the same faces (inference mode): the figure ``train.py --pretrained``
logs at start-up and ``tools/check_pretrained.py`` prints.
"""
import collections
import json
import logging
import os

import numpy as np

from recognition import dist

log = logging.getLogger("recognition.train")

MXNET_BN_DEFAULTS = {"eps": 1e-3, "fix_gamma": True}   # what MXNet's BatchNorm uses for an attribute not written
MAX_REL_DIFF = 1e-5            # max |file - backbone| / max |file| above which the two networks are not the same
CHECK_FACES = 8
MBF_STEM = 64                  # MobileFaceNet's stem channels at width scale 1


def symbol_path(spec):
    """``PREFIX-symbol.json`` of checkpoint 'PREFIX,EPOCH'."""
    from eval.embedding import parse_model_spec
    return "%s-symbol.json" % parse_model_spec(spec)[0]


def read_graph(spec):
    """The nodes {name: (op, attrs)} of the checkpoint's ``PREFIX-symbol.json`` (None when the file is absent);
    a file that is not an MXNet graph is an error naming it."""
    path = symbol_path(spec)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            nodes = json.load(f)["nodes"]
        return {node["name"]: (node["op"], node.get("attrs", node.get("attr", {}))) for node in nodes}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError("--pretrained %s: %s is not an MXNet symbol file (%s)" % (spec, path, err)) from None


def _flag(text):
    return str(text).strip().lower() in ("true", "1")


def _bn_settings(nodes):
    """{BN name: {"eps": float, "fix_gamma": bool}} with MXNet's defaults where an attribute is not written."""
    return {name: {"eps": float(attrs.get("eps", MXNET_BN_DEFAULTS["eps"])),
                   "fix_gamma": _flag(attrs.get("fix_gamma", MXNET_BN_DEFAULTS["fix_gamma"]))}
            for name, (op, attrs) in nodes.items() if op == "BatchNorm"}


def _ours(name, suffix, layers):
    """The backbone layer (in ``layers``) that the file's layer ``name`` is, through its parameter name."""
    from recognition.pretrained import insightface_to_ours
    if name in layers:
        return name
    mapped = insightface_to_ours(name + suffix)
    return mapped[:-len(suffix)] if mapped and mapped.endswith(suffix) and mapped[:-len(suffix)] in layers else None


def _graph_nodes(symbol):
    return {node["name"]: (node["op"], node.get("attrs", {})) for node in json.loads(symbol.tojson())["nodes"]}


def follow_graph(nodes, network, options):
    """(overrides, notes): the ``symbols.get_symbol`` options that make backbone ``network`` built with
    ``options`` compute what the file's graph ``nodes`` computes, and one phrase per change for the log."""
    import symbols
    ours = _bn_settings(_graph_nodes(symbols.get_symbol(network, **options)))
    overrides, notes = {}, []
    bn_layers, changed = {}, collections.defaultdict(list)
    for name, settings in _bn_settings(nodes).items():
        target = _ours(name, "_gamma", ours)
        if target is None:
            continue
        for key, value in settings.items():
            if (not np.isclose(value, ours[target][key], rtol=1e-6, atol=0)) if key == "eps" \
                    else value != ours[target][key]:
                bn_layers.setdefault(target, {})[key] = value
                changed[(key, value)].append(target)
    if bn_layers:
        overrides["bn_layers"] = bn_layers
        for (key, value), layers in sorted(changed.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            where = ", ".join(layers) if len(layers) <= 3 else "%d layers" % len(layers)
            notes.append("BatchNorm %s %s in %s" % (key, value, where))
    # PReLU slopes are variables named *_gamma that feed no BatchNorm (LeakyReLU's, or prelu_conv's own); a graph
    # with ReLUs and no such variable is a ReLU network (prelu_conv's graphs hold ReLUs too)
    batch_norms = {name for name, (op, _) in nodes.items() if op == "BatchNorm"}
    slopes = any(op == "null" and name.endswith("_gamma") and name[:-len("_gamma")] not in batch_norms
                 for name, (op, _) in nodes.items())
    relus = any(op == "Activation" and attrs.get("act_type") == "relu" for op, attrs in nodes.values())
    act_type = options.get("act_type", "prelu")
    if slopes and act_type == "relu":
        overrides["act_type"] = "prelu"
    elif relus and not slopes and act_type != "relu":
        overrides["act_type"] = "relu"
    if "act_type" in overrides:
        notes.append("act_type %s" % overrides["act_type"])
    op, attrs = nodes.get("pre_fc1", (None, {}))
    if op == "FullyConnected":
        bias = not _flag(attrs.get("no_bias", False))
        if bias != (network != "mbf" if options.get("fc_bias") is None else bool(options["fc_bias"])):
            overrides["fc_bias"] = bias
            notes.append("pre_fc1 %s a bias" % ("with" if bias else "without"))
    if network == "mbf":
        stems = [attrs for name, (op, attrs) in nodes.items()
                 if op == "Convolution" and _ours(name, "_weight", {"stem_conv"}) == "stem_conv"]
        if stems and int(stems[0].get("num_filter", 0)) % MBF_STEM == 0:
            scale = int(stems[0]["num_filter"]) // MBF_STEM
            if scale != (options.get("width_scale") or symbols.mobilefacenet.WIDTH_SCALE):
                overrides["width_scale"] = scale
                notes.append("width_scale %d (%d stem channels)" % (scale, scale * MBF_STEM))
    return overrides, notes


def backbone_options(spec, network, options):
    """``options`` updated with what checkpoint ``spec``'s graph says (``follow_graph``), logged on rank 0; the
    options unchanged when the checkpoint has no symbol file."""
    nodes = read_graph(spec)
    if nodes is None:
        if dist.rank() == 0:
            log.warning("--pretrained %s: no %s, so the layer settings (BatchNorm eps, ...) are the config's and "
                        "the start is not checked against the file's graph", spec, symbol_path(spec))
        return dict(options)
    overrides, notes = follow_graph(nodes, network, options)
    if notes and dist.rank() == 0:
        log.info("--pretrained %s: the backbone follows %s where it differs from the config: %s",
                 spec, symbol_path(spec), "; ".join(notes))
    return dict(options, **overrides)


# ----------------------------------------------------------------------------------------------- the check
def check_faces(count=CHECK_FACES, seed=0):
    """``count`` deterministic raw RGB faces (count, 3, 112, 112) float32: smooth random images in 0..255."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 3, 15, 15)).astype(np.float32)
    faces = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :112, :112]
    return np.clip(faces + rng.normal(0, 12, faces.shape).astype(np.float32), 0, 255)


def compare(expected, got):
    """{"max_rel_diff": max |expected - got| / max |expected|, "min_cosine": the lowest row cosine}."""
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosine = np.einsum("ij,ij->i", expected, got) / np.maximum(norms, 1e-30)
    return {"max_rel_diff": float(np.abs(expected - got).max() / max(np.abs(expected).max(), 1e-30)),
            "min_cosine": float(cosine.min())}


def check_against_file(spec, symbol, arg_params, aux_params, ctx=None):
    """``compare`` of the checkpoint's own graph with its own parameters against ``symbol`` with
    ``arg_params`` / ``aux_params``, both in inference mode on ``check_faces``."""
    from eval.embedding import MXNetBackend
    faces = check_faces()
    theirs = MXNetBackend.from_checkpoint(spec, ctx=ctx, batch_size=len(faces)).forward(faces)
    ours = MXNetBackend(symbol, arg_params, aux_params, ctx=ctx, batch_size=len(faces)).forward(faces)
    if theirs.shape != ours.shape:
        raise ValueError("--pretrained %s: the file's graph gives embeddings of %s, the backbone %s"
                         % (spec, theirs.shape[1:], ours.shape[1:]))
    return compare(theirs, ours)


def startup_check(spec, match, symbol, arg_params, aux_params, ctx=None):
    """On rank 0: {"loaded", "renamed", "complete", "max_rel_diff", "min_cosine"} of the backbone just loaded
    from ``spec`` (``match``: its ``pretrained.Match``; complete: no misfit at all), logged; None on other ranks
    or without a symbol file. A graph that cannot be run is reported as {"error": ...} and a warning: the run
    goes on."""
    import mxnet as mx
    if dist.rank() != 0 or not os.path.isfile(symbol_path(spec)):
        return None
    report = {"loaded": len(match.sources), "renamed": match.renamed, "complete": match.complete}
    try:
        report.update(check_against_file(spec, symbol, arg_params, aux_params, ctx))
    except (ValueError, OSError, mx.base.MXNetError) as err:
        report["error"] = str(err).strip().splitlines()[0]
        log.warning("--pretrained %s: could not run the file's graph to check the start: %s", spec, report["error"])
        return report
    same = report["max_rel_diff"] <= MAX_REL_DIFF
    (log.info if same else log.warning)(
        "--pretrained %s: the backbone against the file's own graph on %d faces: max |diff| / max |file| %.2e, "
        "min cosine %.8f%s", spec, CHECK_FACES, report["max_rel_diff"], report["min_cosine"],
        "" if same else " (above %g: training does not start from the network in the file; see "
        "tools/check_pretrained.py)" % MAX_REL_DIFF)
    return report
