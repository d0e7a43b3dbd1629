"""Export a legacy MXNet embedding checkpoint to ONNX that runs in ONNX Runtime, checked against MXNet.

    python tools/export_onnx.py --model models/r50/model,1 --output r50.onnx [--batch-size N|dynamic] [--simplify]
    python tools/export_onnx.py --check-backbones r18,mbf --act-types prelu,prelu_conv --batches 1,8

The graph is translated by MXNet 1.9.1's own exporter (``mx.onnx.export_model``). What it writes loads in ONNX
Runtime but is wrong or fails there, so ``repair`` rewrites it:
    PRelu slopes      exported with shape (C,): ONNX broadcasts numpy-style from the last axis, so on an
                      (N, C, H, W) map they would meet the width; reshaped to (C, 1, 1)
    fix_gamma BN      MXNet computes with gamma = 1 whatever is stored, the exporter copies the stored gamma
    graph inputs      every parameter is also listed as a graph input (overridable, so never constant-folded):
                      parameters are initialisers only, 'data' is the one input
    output name       the exporter strips '_output': the embedding is named fc1_output again, shape (batch, D)
    FC flatten        the exporter reads a FullyConnected without a flatten attribute as flatten=False (MXNet's
                      default is True): written out before the export (``explicit_flatten``)
    opset             the translations target opsets 12-13, the model is stamped with the installed onnx's newest
                      (22 for onnx 1.17, where some ops read their arguments differently): stamped 13
    input scaling     insightface.model_zoo (ArcFaceONNX) feeds raw pixels only to a graph with a node named
                      Sub*/_minus* and one named Mul*/_mul* among its first 8, else (x - 127.5) / 127.5, which
                      this graph would normalise again: ``name_input_normalisation`` makes that hold on purpose
Parameters are written as raw bytes by ``raw_initializers`` (the exporter converts every value to a Python
float: a minute and several GB for r200). The result passes ``onnx.checker`` (full check) and is compared with
MXNet on the same random faces, batch 1 and 8 of the one dynamic model (or the fixed batch): every row must
have cosine >= 0.99999 and max |difference| <= 1e-4 x its norm. Only then is the file written (atomically).
``--simplify`` adds ONNX Runtime's basic offline optimisation (constant folding, BN folded into the convs; the
result holds standard ONNX ops only) and checks again. ``--check-backbones`` runs all of this on fresh
backbones with trained-like weights (``trained_like_params``) and prints the table of docs/onnx.md.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import cli  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402

OUTPUT_NAME = "fc1_output"
INPUT_NAME = "data"
BATCH_DIM = "batch"              # the symbolic batch dimension of a dynamic model
STAMPED_OPSET = 13               # the newest opset MXNet 1.9.1's translation tables are written for
MIN_COSINE = 0.99999             # per row, ONNX Runtime vs MXNet
MAX_RELATIVE_DIFF = 1e-4         # per row: max |onnx - mxnet| / ||mxnet||
CHECK_BATCHES = (1, 8)


def log(message):
    print("[export_onnx] %s" % message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- checkpoint
def load_checkpoint(spec):
    """(embedding symbol, arg_params, aux_params) of the legacy checkpoint 'PREFIX,EPOCH'; errors name the file."""
    from eval import embedding
    prefix, _ = embedding.parse_model_spec(spec)
    symbol, arg_params, aux_params = embedding.load_checkpoint(spec)     # damaged files: errors name them
    internals = symbol.get_internals()
    if OUTPUT_NAME in internals.list_outputs():
        symbol = internals[OUTPUT_NAME]           # a training graph with a loss on top: cut at the embedding
    elif len(symbol.list_outputs()) != 1:
        raise ValueError("%s-symbol.json has no %s and %d outputs; cannot tell which is the embedding"
                         % (prefix, OUTPUT_NAME, len(symbol.list_outputs())))
    return symbol, arg_params, aux_params


# ---------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def raw_initializers():
    """Within the block, MXNet's exporter stores parameters as raw-byte initialisers. Its own translation of a
    parameter ('null' node) builds a Python list of every value: r200 (119 M values) then takes about a minute
    and several GB. The graph inputs it also declares are removed by ``repair``."""
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph      # the exporter's translation table
    from onnx import helper, numpy_helper
    tables = [table for table in MXNetGraph.registry_.values() if "null" in table]
    originals = [table["null"] for table in tables]

    def translate(original):
        def convert(node, **kwargs):
            if kwargs["is_input"]:
                return original(node, **kwargs)
            name, array = node["name"], kwargs["weights"][node["name"]]
            kwargs["initializer"].append(numpy_helper.from_array(array, name))
            info = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
            return [info], (array.dtype,)
        return convert

    for table, original in zip(tables, originals):
        table["null"] = translate(original)
    try:
        yield
    finally:
        for table, original in zip(tables, originals):
            table["null"] = original


def _rename_tensor(graph, old, new):
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in graph.output:
        if value.name == old:
            value.name = new


def _set_shape(value, dims):
    """Set the tensor shape of a graph input/output ValueInfo: ints are fixed, strings symbolic."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for size in dims:
        dim = shape.dim.add()
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = int(size)


def _mxnet_nodes(symbol, image_size):
    """{node name: (op, attrs, output rank)} of the MXNet graph (ranks from shape inference on one face)."""
    internals = symbol.get_internals()
    _, shapes, _ = internals.infer_shape(**{INPUT_NAME: (1, 3) + tuple(image_size)})
    ranks = {name[:-len("_output")]: len(shape) for name, shape in zip(internals.list_outputs(), shapes)
             if name.endswith("_output")}
    return {node["name"]: (node["op"], node.get("attrs", {}), ranks.get(node["name"]))
            for node in json.loads(symbol.tojson())["nodes"]}


def repair(model, symbol, batch_size, image_size):
    """Make the exporter's ``model`` of ``symbol`` correct in ONNX Runtime (see the module docstring); in place.
    ``batch_size`` None means a dynamic batch."""
    from onnx import numpy_helper
    graph = model.graph
    mx_nodes = _mxnet_nodes(symbol, image_size)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    def replace_input(node, index, array):
        """Give ``node`` ``array`` as its initialiser input ``index``: in place, or as a copy of its own when
        other nodes share the original."""
        name = node.input[index]
        if consumers[name] > 1:
            consumers[name] -= 1
            name = node.input[index] = "%s_%s" % (node.name, name)
            initializers[name] = graph.initializer.add()
        initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))

    for node in graph.node:
        op, attrs, rank = mx_nodes.get(node.name, (None, {}, None))
        if node.op_type == "PRelu" and node.input[1] in initializers:
            slope = numpy_helper.to_array(initializers[node.input[1]])
            if slope.ndim == 1 and slope.size > 1:
                if rank is None:
                    raise ValueError("PRelu node %s has no MXNet counterpart to take its input rank from" % node.name)
                replace_input(node, 1, slope.reshape((-1,) + (1,) * (rank - 2)))
        if node.op_type == "BatchNormalization" and op == "BatchNorm" \
                and attrs.get("fix_gamma", "True").lower() in ("true", "1"):      # MXNet's default is fixed
            replace_input(node, 1, np.ones_like(numpy_helper.to_array(initializers[node.input[1]])))

    graph_inputs = [value for value in graph.input if value.name not in initializers]
    if [value.name for value in graph_inputs] != [INPUT_NAME]:
        raise ValueError("the exported graph takes %s; expected the one input %r"
                         % (", ".join(value.name for value in graph_inputs), INPUT_NAME))
    del graph.input[:]
    graph.input.extend(graph_inputs)
    batch = BATCH_DIM if batch_size is None else int(batch_size)
    _set_shape(graph.input[0], (batch, 3) + tuple(image_size))

    if len(graph.output) != 1:
        raise ValueError("the exported graph has %d outputs, expected one embedding" % len(graph.output))
    _rename_tensor(graph, graph.output[0].name, OUTPUT_NAME)
    _, (out_shape,), _ = symbol.infer_shape(**{INPUT_NAME: (1, 3) + tuple(image_size)})
    _set_shape(graph.output[0], (batch,) + tuple(out_shape[1:]))

    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]     # nothing orphaned by the copies
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = min(opset.version, STAMPED_OPSET)
    del graph.value_info[:]                      # stale after the edits (onnx.checker's full check re-infers)
    return model


# insightface.model_zoo.ArcFaceONNX: a graph normalises its own input when, among its first 8 nodes, one's name
# starts with Sub or _minus and one's with Mul or _mul
INSIGHTFACE_NODES, INSIGHTFACE_SUB, INSIGHTFACE_MUL = 8, ("Sub", "_minus"), ("Mul", "_mul")


def name_input_normalisation(model):
    """Make InsightFace's detection of in-graph input normalisation (``INSIGHTFACE_*``) true exactly when the graph
    normalises its input: the Sub -> Mul by constants that the input (through Identity nodes) meets first are moved
    to the front of the node list (with the Constant nodes they read) and named _minus* / _mul* if they are not;
    any other node among the first 8 named like them is renamed. In place; returns ``model``."""
    graph = model.graph
    nodes = list(graph.node)
    producers = {output: node for node in nodes for output in node.output}
    constants = {tensor.name for tensor in graph.initializer}

    def constant(name):
        return name in constants or (name in producers and producers[name].op_type == "Constant")
    chain, tensor = [], INPUT_NAME
    for op_type in ("Sub", "Mul"):
        users = [node for node in nodes if tensor in node.input]
        while len(users) == 1 and users[0].op_type == "Identity" and op_type == "Sub":
            chain.append(users[0])
            tensor = users[0].output[0]
            users = [node for node in nodes if tensor in node.input]
        found = [node for node in users if node.op_type == op_type and list(node.input).count(tensor) == 1
                 and all(constant(name) for name in node.input if name != tensor)]
        if len(found) != 1:
            chain = []
            break
        chain += [producers[name] for name in found[0].input if name in producers and name != tensor]
        chain.append(found[0])
        tensor = found[0].output[0]
    for node, prefixes in zip([n for n in chain if n.op_type in ("Sub", "Mul")], (INSIGHTFACE_SUB, INSIGHTFACE_MUL)):
        if not node.name.startswith(prefixes):
            node.name = "%s_input_%s" % (prefixes[-1], node.name or "scaling")
    ordered = chain + [node for node in nodes if all(node is not c for c in chain)]
    for node in ordered[:INSIGHTFACE_NODES] if not chain else ():
        if node.name.startswith(INSIGHTFACE_SUB + INSIGHTFACE_MUL):      # would pass for normalisation
            node.name = "node_" + node.name
    copies = []
    for node in ordered:            # copied out before the repeated field is cleared
        copies.append(type(node)())
        copies[-1].CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
    return model


def explicit_flatten(symbol):
    """``symbol`` with MXNet's default ``flatten=True`` written on every FullyConnected that leaves it out: MXNet
    1.9.1's exporter reads a missing one as False and mistranslates an FC on a 4-D map (InsightFace's fresnet 'E'
    and fmobilefacenet 'GDC' heads)."""
    import mxnet as mx
    graph = json.loads(symbol.tojson())
    for node in graph["nodes"]:
        if node["op"] == "FullyConnected":
            node.setdefault("attrs", {}).setdefault("flatten", "True")
    return mx.sym.load_json(json.dumps(graph))


def export(symbol, arg_params, aux_params, batch_size=None, image_size=(112, 112)):
    """The repaired ``onnx.ModelProto`` of the embedding ``symbol`` with its parameters; input 'data' raw RGB
    0..255 NCHW float32, ``batch_size`` rows (None: dynamic), output fc1_output."""
    import mxnet as mx
    import onnx
    if OUTPUT_NAME in symbol.get_internals().list_outputs() and symbol.list_outputs() != [OUTPUT_NAME]:
        symbol = symbol.get_internals()[OUTPUT_NAME]
    symbol = explicit_flatten(symbol)
    names = set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())
    params = {k: v for k, v in list(arg_params.items()) + list(aux_params.items()) if k in names}
    missing = sorted(names - set(params) - {INPUT_NAME})
    if missing:
        raise ValueError("parameters missing for the embedding graph: %s" % ", ".join(missing[:10]))
    shape = (1 if batch_size is None else int(batch_size), 3) + tuple(image_size)
    with tempfile.TemporaryDirectory(prefix="export_onnx-") as work:
        path = os.path.join(work, "model.onnx")
        # the exporter prints the names of some nodes it converts (e.g. _rminus_scalar): keep stdout clean
        with raw_initializers(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            mx.onnx.export_model(symbol, params, [shape], np.float32, path, dynamic=batch_size is None,
                                 dynamic_input_shapes=[(None,) + shape[1:]] if batch_size is None else None)
        model = onnx.load(path)
    return name_input_normalisation(repair(model, symbol, batch_size, image_size))


def simplify(model):
    """ONNX Runtime's basic offline optimisation of ``model`` (constant folding, redundant nodes removed, BN
    folded into convs): a standard-ONNX graph that any runtime reads."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="export_onnx-") as work:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(work, "simplified.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        simplified = onnx.load(options.optimized_model_filepath)
    foreign = sorted({node.domain for node in simplified.graph.node if node.domain not in ("", "ai.onnx")})
    if foreign:
        raise ValueError("the simplified graph uses non-standard operator domains: %s" % ", ".join(foreign))
    # ONNX Runtime declares every domain it knows (com.microsoft, ...); keep the standard one only
    standard = [opset for opset in simplified.opset_import if opset.domain in ("", "ai.onnx")]
    del simplified.opset_import[:]
    simplified.opset_import.extend(standard)
    return name_input_normalisation(simplified)


# ----------------------------------------------------------------------------------------------- checks
def random_faces(count, image_size, seed=0):
    """``count`` float32 raw RGB faces (count, 3, H, W): smooth random images in 0..255 (not i.i.d. noise, so
    the convolutions see structure)."""
    rng = np.random.default_rng(seed)
    height, width = image_size
    coarse = rng.uniform(0, 255, (count, 3, height // 8 + 1, width // 8 + 1)).astype(np.float32)
    faces = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :height, :width]
    faces += rng.normal(0, 12, faces.shape).astype(np.float32)
    return np.clip(faces, 0, 255)


def mxnet_embeddings(symbol, arg_params, aux_params, faces):
    """MXNet's (n, D) float32 embeddings of ``faces`` (n, 3, H, W) raw RGB, inference mode on the CPU."""
    import mxnet as mx
    module = mx.mod.Module(symbol, data_names=[INPUT_NAME], label_names=None, context=mx.cpu())
    module.bind(data_shapes=[(INPUT_NAME, faces.shape)], for_training=False)
    module.set_params(arg_params, aux_params, allow_missing=False, allow_extra=True)
    module.forward(mx.io.DataBatch(data=[mx.nd.array(faces)]), is_train=False)
    return module.get_outputs()[0].asnumpy().reshape(len(faces), -1)


def onnx_session(model, threads=0):
    """An ONNX Runtime CPU session of ``model`` (a ModelProto)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def agreement(reference, candidate):
    """(min cosine over the rows, max over the rows of max |candidate - reference| / ||reference||)."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    ref_norm, cand_norm = np.linalg.norm(reference, axis=1), np.linalg.norm(candidate, axis=1)
    cosine = np.einsum("ij,ij->i", reference, candidate) / np.maximum(ref_norm * cand_norm, 1e-30)
    relative = np.abs(candidate - reference).max(axis=1) / np.maximum(ref_norm, 1e-30)
    return float(cosine.min()), float(relative.max())


def compare_with_mxnet(model, symbol, arg_params, aux_params, batches, image_size, seed=0, threads=0):
    """[(batch, min cosine, max relative difference)]: ONNX Runtime running ``model`` against MXNet on the same
    random faces, one entry per batch size in ``batches``; raises ValueError when a row is out of tolerance."""
    session = onnx_session(model, threads)
    results = []
    for batch in batches:
        faces = random_faces(batch, image_size, seed=seed + batch)
        expected = mxnet_embeddings(symbol, arg_params, aux_params, faces)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: faces})[0]
        if got.shape != expected.shape:
            raise ValueError("batch %d: ONNX Runtime returned %s, MXNet %s" % (batch, got.shape, expected.shape))
        cosine, relative = agreement(expected, got)
        results.append((batch, cosine, relative))
        if not (cosine >= MIN_COSINE and relative <= MAX_RELATIVE_DIFF):
            raise ValueError("batch %d: ONNX Runtime disagrees with MXNet: min cosine %.7f (needs >= %g), max "
                             "|difference| / norm %.2e (needs <= %g)"
                             % (batch, cosine, MIN_COSINE, relative, MAX_RELATIVE_DIFF))
    return results


def export_checked(symbol, arg_params, aux_params, batch_size=None, image_size=(112, 112), do_simplify=False,
                   threads=0, report=log):
    """``export`` + ``onnx.checker`` (full) + ``compare_with_mxnet`` (+ ``simplify`` and both checks again).
    Returns (model, comparisons: {stage: [(batch, min cosine, max relative difference)]})."""
    import onnx
    begin = time.time()
    model = export(symbol, arg_params, aux_params, batch_size, image_size)
    report("exported and repaired in %.1f s (%d nodes, %.1f M parameter values)"
           % (time.time() - begin, len(model.graph.node),
              sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6))
    batches = CHECK_BATCHES if batch_size is None else (int(batch_size),)
    comparisons = {}
    for stage in ("export", "simplified") if do_simplify else ("export",):
        if stage == "simplified":
            begin = time.time()
            model = simplify(model)
            report("simplified in %.1f s (%d nodes)" % (time.time() - begin, len(model.graph.node)))
        onnx.checker.check_model(model, full_check=True)
        begin = time.time()
        comparisons[stage] = compare_with_mxnet(model, symbol, arg_params, aux_params, batches, image_size,
                                                threads=threads)
        report("%s: onnx.checker passed; ONNX Runtime vs MXNet (%.1f s): %s" % (stage, time.time() - begin, "; ".join(
            "batch %d min cosine %.8f, max |diff|/norm %.1e" % row for row in comparisons[stage])))
    return model, comparisons


# ------------------------------------------------------------------------------------ trained-like weights
def trained_like_params(symbol_builder, image_size=(112, 112), seed=0, calibration_batch=4):
    """(symbol, arg_params, aux_params): random weights that look trained rather than freshly initialised.

    ``symbol_builder(bn_mom)`` returns the network. Convolution / FC weights are He-scaled normals, BN gammas in
    [0.5, 1.5] (also where gamma is fixed: an exporter must not use them), betas and biases non-zero, PReLU slopes
    in [0.05, 0.45]. BN moving statistics come from one training-mode forward of the network built with
    momentum 0 on random faces (so the activations keep a sane scale through 200 layers), then are perturbed
    (means shifted, variances scaled by 0.7-1.4) so they are not the batch's own."""
    import mxnet as mx
    rng = np.random.default_rng(seed)
    symbol = symbol_builder(0.9)
    shape = (calibration_batch, 3) + tuple(image_size)
    arg_shapes, _, aux_shapes = symbol.infer_shape(**{INPUT_NAME: shape})
    arg_params = {}
    for name, arg_shape in zip(symbol.list_arguments(), arg_shapes):
        if name == INPUT_NAME:
            continue
        if name.endswith("_weight"):
            value = rng.standard_normal(arg_shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(arg_shape[1:])))
        elif name.endswith("_gamma") and "_act" in name:          # PReLU slopes
            value = rng.uniform(0.05, 0.45, arg_shape)
        elif name.endswith("_gamma"):
            value = rng.uniform(0.5, 1.5, arg_shape)
        else:                                                     # BN betas, FC biases
            value = rng.normal(0, 0.2, arg_shape)
        arg_params[name] = mx.nd.array(value, dtype=np.float32)
    aux_params = {name: mx.nd.array(np.full(aux_shape, 1.0 if name.endswith("_var") else 0.0, np.float32))
                  for name, aux_shape in zip(symbol.list_auxiliary_states(), aux_shapes)}
    calibrating = mx.mod.Module(symbol_builder(0.0), data_names=[INPUT_NAME], label_names=None, context=mx.cpu())
    calibrating.bind(data_shapes=[(INPUT_NAME, shape)], for_training=True, grad_req="null")
    calibrating.set_params(arg_params, aux_params)
    calibrating.forward(mx.io.DataBatch(data=[mx.nd.array(random_faces(calibration_batch, image_size, seed))]),
                        is_train=True)
    mx.nd.waitall()
    _, batch_stats = calibrating.get_params()
    for name, value in batch_stats.items():
        stats = value.asnumpy().astype(np.float64)
        if name.endswith("_var"):
            stats = np.maximum(stats, 1e-3) * rng.uniform(0.7, 1.4, stats.shape)
        else:
            spread = np.sqrt(np.maximum(batch_stats[name[:-len("mean")] + "var"].asnumpy(), 1e-3))
            stats = stats + rng.normal(0, 0.1, stats.shape) * spread
        aux_params[name] = mx.nd.array(stats.astype(np.float32))
    return symbol, arg_params, aux_params


def check_backbones(networks, act_types, batches=CHECK_BATCHES, image_size=(112, 112), threads=0):
    """Export every backbone x activation with trained-like weights as one dynamic model and compare it with
    MXNet at ``batches``: one row per batch, as dicts (network, act_type, batch, cosine, cosine_gap = 1 - cosine,
    relative, export_s, export_cpu_s, values_m: stored values, parameters + BN statistics, in millions); each row
    is also logged as it comes."""
    import onnx
    import symbols
    from tqdm import tqdm
    rows = []
    for network, act_type in tqdm([(n, a) for n in networks for a in act_types], desc="backbones", file=sys.stderr):
        def build(bn_mom, network=network, act_type=act_type):
            return symbols.get_symbol(network, act_type=act_type, bn_mom=bn_mom)
        symbol, arg_params, aux_params = trained_like_params(build, image_size)
        begin, begin_cpu = time.time(), time.process_time()
        model = export(symbol, arg_params, aux_params, None, image_size)
        export_s, export_cpu_s = time.time() - begin, time.process_time() - begin_cpu
        onnx.checker.check_model(model, full_check=True)
        try:
            results = compare_with_mxnet(model, symbol, arg_params, aux_params, batches, image_size, threads=threads)
        except ValueError as error:
            raise ValueError("%s %s: %s" % (network, act_type, error)) from error
        values_m = sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6
        for batch, cosine, relative in results:
            rows.append(dict(network=network, act_type=act_type, batch=batch, cosine=cosine, cosine_gap=1 - cosine,
                             relative=relative, export_s=export_s, export_cpu_s=export_cpu_s, values_m=values_m))
            log(_TABLE_ROW % rows[-1])
    return rows


# ------------------------------------------------------------------------------------------------- CLI
def parse_batch_size(text):
    """'dynamic' -> None, 'N' -> N >= 1."""
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a positive integer or 'dynamic', got %r" % text)
    return int(text)


def batch_list(text):
    """'1,8' -> (1, 8): batch sizes >= 1."""
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError("expected comma-separated batch sizes >= 1, got %r" % text)
    return batches


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a legacy MXNet checkpoint (PREFIX-symbol.json + "
                                                 "PREFIX-%%04d.params) to ONNX, checked in ONNX Runtime against "
                                                 "MXNet; or check the export of fresh backbones.")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--model", help="checkpoint PREFIX,EPOCH to export")
    task.add_argument("--check-backbones", metavar="NAMES",
                      help="comma-separated backbones (r18,r34,r50,r100,r200,mbf) to export with trained-like "
                           "weights and compare; prints a markdown table, writes no file")
    parser.add_argument("--output", help="the .onnx file to write (with --model)")
    parser.add_argument("--batch-size", type=parse_batch_size, default=None, metavar="N|dynamic",
                        help="input batch fixed at N, or 'dynamic' (default)")
    parser.add_argument("--simplify", action="store_true",
                        help="also apply ONNX Runtime's basic offline optimisation (constant folding, BN folding)")
    parser.add_argument("--image-size", type=cli.image_size, default=(112, 112),
                        help="H,W of the faces (default 112,112)")
    parser.add_argument("--act-types", default="prelu,prelu_conv", help="with --check-backbones (default %(default)s)")
    parser.add_argument("--batches", type=batch_list, default=CHECK_BATCHES,
                        help="with --check-backbones: batch sizes compared (default 1,8)")
    parser.add_argument("--threads", type=cli.int_at_least(0), default=0, help="ONNX Runtime threads (0: its default)")
    args = parser.parse_args(argv)
    if args.model and not args.output:
        parser.error("--model needs --output")
    return args


_TABLE_ROW = ("| %(network)s | %(act_type)s | %(values_m).3f | %(export_s).1f | %(export_cpu_s).1f | %(batch)d | "
              "%(cosine_gap).1e | %(relative).1e |")


def _markdown_table(rows):
    lines = ["| network | act_type | stored values (M) | export wall (s) | export CPU (s) | batch | 1 - min cosine | "
             "max abs diff / norm |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [_TABLE_ROW % row for row in rows])


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after printing an error)."""
    args = parse_args(argv)
    import mxnet as mx
    import onnx
    try:
        image_size = args.image_size
        if args.check_backbones:
            rows = check_backbones([n.strip() for n in args.check_backbones.split(",") if n.strip()],
                                   [a.strip() for a in args.act_types.split(",") if a.strip()],
                                   args.batches, image_size, args.threads)
            print(_markdown_table(rows))
            return 0
        cli.check_output_file(args.output, "--output")        # before the long export
        begin = time.time()
        symbol, arg_params, aux_params = load_checkpoint(args.model)
        log("loaded %s in %.1f s" % (args.model, time.time() - begin))
        model, _ = export_checked(symbol, arg_params, aux_params, args.batch_size, image_size, args.simplify,
                                  args.threads)
        atomic_write_bytes(args.output, model.SerializeToString())
        log("wrote %s (%.1f MB): input %s (%s, 3, %d, %d) float32 raw RGB 0..255, output %s"
            % (args.output, os.path.getsize(args.output) / 1e6, INPUT_NAME,
               BATCH_DIM if args.batch_size is None else args.batch_size, image_size[0], image_size[1], OUTPUT_NAME))
    except (OSError, ValueError, mx.base.MXNetError, onnx.checker.ValidationError,
            onnx.shape_inference.InferenceError) as error:
        print("error: %s" % error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
