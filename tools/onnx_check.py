"""The check of an ONNX export against MXNet: ONNX Runtime and MXNet embed the same random faces, batch 1 and 8
of a dynamic model (or its fixed batch), and every row must have cosine >= 0.99999 and max |difference| <= 1e-4 x
its norm. ``export_checked`` runs export + ``onnx.checker`` (full check) + this comparison (+ ``simplify`` and
both checks again); ``check_backbones`` runs it on fresh backbones with trained-like weights
(``trained_like_params``) and gives the table of docs/onnx.md.
"""
import sys
import time

import numpy as np

from tools.onnx_repair import INPUT_NAME, OUTPUT_NAME, export, simplify

MIN_COSINE = 0.99999             # per row, ONNX Runtime vs MXNet
MAX_RELATIVE_DIFF = 1e-4         # per row: max |onnx - mxnet| / ||mxnet||
CHECK_BATCHES = (1, 8)


def log(message):
    """One progress line on stderr, under the name of the tool (tools/export_onnx.py)."""
    print("[export_onnx] %s" % message, file=sys.stderr, flush=True)


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



_TABLE_ROW = ("| %(network)s | %(act_type)s | %(values_m).3f | %(export_s).1f | %(export_cpu_s).1f | %(batch)d | "
              "%(cosine_gap).1e | %(relative).1e |")


def markdown_table(rows):
    lines = ["| network | act_type | stored values (M) | export wall (s) | export CPU (s) | batch | 1 - min cosine | "
             "max abs diff / norm |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [_TABLE_ROW % row for row in rows])
