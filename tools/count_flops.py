"""Cost of each backbone: parameters and multiply-accumulates at 112x112, and CPU training throughput.

    python tools/count_flops.py                                  # the table, all backbones
    OMP_NUM_THREADS=1 python tools/count_flops.py --throughput mbf r18 --batch-size 32 --iters 5
    OMP_NUM_THREADS=1 python tools/count_flops.py --throughput mbf r18 --act-type prelu_conv

Parameters are the symbol's arguments except `data` (conv / FC weights, BN gamma + beta, PReLU slopes: what
PyTorch's `model.parameters()` counts); BN moving mean / var are listed apart. MACs come from the symbol's
inferred layer shapes: Convolution and FullyConnected exactly; BatchNorm / PReLU / ReLU / residual adds /
input normalisation are counted separately, one op per output element.
Throughput: forward + backward (no optimiser update) of a bound `mx.mod.Module`, random input and head gradient.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import symbols  # noqa: E402
from symbols.common import ACT_TYPES  # noqa: E402
from utils import cli  # noqa: E402

ELEMENTWISE_OPS = ("BatchNorm", "LeakyReLU", "Activation", "elemwise_add", "_Plus", "_minus_scalar",
                   "_mul_scalar")


def param_count(sym, data_shape=(1,) + symbols.INPUT_SHAPE):
    """(parameters, BN moving statistics) of `sym`, from infer_shape only (nothing is allocated)."""
    arg_shapes, _, aux_shapes = sym.infer_shape(data=data_shape)
    params = sum(int(np.prod(shape)) for name, shape in zip(sym.list_arguments(), arg_shapes) if name != "data")
    return params, sum(int(np.prod(shape)) for shape in aux_shapes)


def mac_count(sym, data_shape=(1,) + symbols.INPUT_SHAPE):
    """Per-batch {'conv', 'fc', 'elementwise'} operation counts of `sym` for input `data_shape`."""
    internals = sym.get_internals()
    arg_shapes, out_shapes, _ = internals.infer_shape(data=data_shape)
    shapes = dict(zip(internals.list_arguments(), arg_shapes))
    shapes.update(zip(internals.list_outputs(), out_shapes))
    counts = {"conv": 0, "fc": 0, "elementwise": 0}
    for node in json.loads(sym.tojson())["nodes"]:
        op, name = node["op"], node["name"]
        if op == "null":
            continue
        out_elements = int(np.prod(shapes[name + "_output"]))
        if op in ("Convolution", "FullyConnected"):
            # each output element takes one MAC per weight of its filter: (C_in / groups) * kh * kw, or C_in
            per_output = int(np.prod(shapes[name + "_weight"][1:]))
            counts["conv" if op == "Convolution" else "fc"] += out_elements * per_output
        elif op in ELEMENTWISE_OPS:
            counts["elementwise"] += out_elements
    return counts


def cost_table(networks=symbols.NETWORKS, embedding_size=512):
    """One row per network: name, params, BN moving stats, conv MACs, FC MACs, elementwise ops (per image)."""
    rows = []
    for name in networks:
        sym = symbols.get_symbol(name, embedding_size=embedding_size)
        params, moving = param_count(sym)
        macs = mac_count(sym)
        rows.append((name, params, moving, macs["conv"], macs["fc"], macs["elementwise"]))
    return rows


def format_table(rows):
    """The cost table as Markdown."""
    lines = ["| network | params (M) | BN moving stats (M) | MACs (G) | of which conv (G) | of which FC (G) "
             "| elementwise ops (G, apart) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, params, moving, conv, fc, elementwise in rows:
        lines.append("| %s | %.3f | %.3f | %.3f | %.3f | %.4f | %.3f |"
                     % (name, params / 1e6, moving / 1e6, (conv + fc) / 1e9, conv / 1e9, fc / 1e9, elementwise / 1e9))
    return "\n".join(lines)


def measure_throughput(name, batch_size=32, iters=5, warmup=1, act_type="prelu", embedding_size=512, ctx=None,
                       seed=0):
    """Forward + backward images/s of backbone `name` in a bound Module (median over `iters` timed steps)."""
    import mxnet as mx
    from tqdm import tqdm
    ctx = mx.cpu() if ctx is None else ctx
    sym = symbols.get_symbol(name, embedding_size=embedding_size, act_type=act_type)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=ctx)
    mod.bind(data_shapes=[("data", (batch_size,) + symbols.INPUT_SHAPE)], for_training=True)
    mod.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    rng = np.random.default_rng(seed)
    batch = mx.io.DataBatch([mx.nd.array(rng.uniform(0, 255, (batch_size,) + symbols.INPUT_SHAPE), ctx=ctx)])
    head_grad = [mx.nd.array(rng.standard_normal((batch_size, embedding_size)), ctx=ctx)]
    seconds = []
    for step in tqdm(range(warmup + iters), desc="%s fwd+bwd b%d" % (name, batch_size), unit="step"):
        start = time.perf_counter()
        mod.forward(batch, is_train=True)
        mod.backward(head_grad)
        mx.nd.waitall()                            # MXNet runs asynchronously: wait for every gradient
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return batch_size / float(np.median(seconds))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--throughput", nargs="+", metavar="NETWORK", choices=symbols.NETWORKS,
                   help="measure CPU forward+backward images/s of these networks instead of the cost table")
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=32)
    p.add_argument("--iters", type=cli.int_at_least(1), default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=cli.int_at_least(0), default=1)
    p.add_argument("--embedding-size", type=cli.int_at_least(1), default=512)
    p.add_argument("--act-type", default="prelu", choices=ACT_TYPES,
                   help="throughput only: MXNet's CPU PReLU backward is slow; prelu_conv is the fast equivalent")
    args = p.parse_args(argv)
    if args.throughput:
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        for name in args.throughput:
            speed = measure_throughput(name, args.batch_size, args.iters, args.warmup, args.act_type,
                                       args.embedding_size)
            print(json.dumps({"network": name, "act_type": args.act_type, "batch_size": args.batch_size,
                              "omp_num_threads": threads,
                              "images_per_sec": round(speed, 2)}))
        return
    print(format_table(cost_table(embedding_size=args.embedding_size)))


if __name__ == "__main__":
    sys.exit(cli.run(main, "count_flops.py"))
