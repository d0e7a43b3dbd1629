"""MXNet 1.9.1's ONNX exporter (``mx.onnx.export_model``) plus the repairs its output needs in ONNX Runtime.

What the exporter writes loads in ONNX Runtime but is wrong or fails there, so ``repair`` rewrites it:
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
float: a minute and several GB for r200). ``simplify`` is ONNX Runtime's basic offline optimisation (constant
folding, BN folded into the convs; the result holds standard ONNX ops only). tools/onnx_check.py checks the
result against MXNet; tools/export_onnx.py is the command line.
"""
import contextlib
import json
import os
import tempfile

import numpy as np

OUTPUT_NAME = "fc1_output"
INPUT_NAME = "data"
BATCH_DIM = "batch"              # the symbolic batch dimension of a dynamic model
STAMPED_OPSET = 13               # the newest opset MXNet 1.9.1's translation tables are written for


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
