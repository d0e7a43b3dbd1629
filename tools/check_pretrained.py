"""Check, before a long job, that ``train.py --pretrained`` will start from exactly the network in a checkpoint.

    python tools/check_pretrained.py --pretrained zoo/r100/model,0 --network r100
    python tools/check_pretrained.py --pretrained zoo/mobilefacenet/model,0 --network mbf --act-type prelu_conv

It builds the backbone through ``recognition.backbone.Backbone``, the class training builds it with (the
layer settings follow the file's graph, the parameters are matched by name and shape), runs the checkpoint's
own graph (``PREFIX-symbol.json`` with ``PREFIX-EPOCH.params``) and the backbone on the same 8 deterministic faces
in inference mode, and prints one JSON line on stdout:

    {"loaded": 771, "renamed": 79, "max_rel_diff": 0.0, "min_cosine": 1.0}         (fresnet r100)

``loaded``: backbone parameters taken from the file; ``renamed``: of them, found under InsightFace's names;
``max_rel_diff``: max |file - backbone| / max |file| over the embeddings; ``min_cosine``: the lowest per-face
cosine. The log (stderr) says which layer settings were taken from the file and lists any misfit. Exit status:
0 when every backbone parameter came from the file, every file parameter (but the classifier fc7) found its
place and max_rel_diff <= 1e-5; 1 when not; 2 when the check could not run (no graph file, nothing fits, or
embeddings of another size).
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recognition.config import ACTIVATIONS, NETWORKS  # noqa: E402

# a preset whose reader needs no files: only the backbone keys below matter to the check
PRESET = "bench_1m"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Check that train.py --pretrained PREFIX,EPOCH starts from "
                                                 "exactly the network in the checkpoint.")
    parser.add_argument("--pretrained", required=True, metavar="PREFIX,EPOCH",
                        help="the checkpoint (PREFIX-symbol.json and PREFIX-EPOCH.params)")
    parser.add_argument("--network", "--backbone", dest="network", required=True, choices=NETWORKS,
                        help="the backbone train.py will build")
    parser.add_argument("--act-type", choices=ACTIVATIONS, default="prelu", help="as train.py (default %(default)s)")
    parser.add_argument("--embedding-size", type=int, default=512, help="as train.py (default %(default)s)")
    parser.add_argument("--bn-eps", type=float, help="as train.py (default: the config's; the file's graph wins "
                                                     "where it says otherwise)")
    parser.add_argument("--ctx", default="cpu", help="cpu, gpu or gpu:N (default %(default)s)")
    return parser.parse_args(argv)


def run(args):
    """(exit status, the JSON report or None), logging to stderr."""
    import horovod.mxnet as hvd
    from eval.cli import parse_context
    from recognition.backbone import Backbone
    from recognition.config import config_from_args
    from recognition.pretrained_graph import CHECK_FACES, MAX_REL_DIFF, symbol_path
    hvd.init()
    argv = ["--dataset", PRESET, "--network", args.network, "--act-type", args.act_type, "--embedding-size",
            str(args.embedding_size), "--pretrained", args.pretrained, "--pretrained-partial", "--no-fp16"]
    cfg = config_from_args(argv + (["--bn-eps", repr(args.bn_eps)] if args.bn_eps is not None else []))
    if not os.path.isfile(symbol_path(cfg.pretrained)):
        raise FileNotFoundError("--pretrained %s: %s not found; the check runs the file's own graph"
                                % (cfg.pretrained, symbol_path(cfg.pretrained)))
    backbone = Backbone(cfg, parse_context(args.ctx), CHECK_FACES)
    found = backbone.pretrained_check
    if "error" in found:
        raise ValueError(found["error"])
    report = {key: found[key] for key in ("loaded", "renamed", "max_rel_diff", "min_cosine")}
    complete = found["complete"]
    if not complete:
        logging.error("the file and the backbone do not fit each other (the misfits are listed above)")
    if report["max_rel_diff"] > MAX_REL_DIFF:
        logging.error("max_rel_diff %.2e > %g: the backbone does not compute what the file's graph computes",
                      report["max_rel_diff"], MAX_REL_DIFF)
    return (0 if complete and report["max_rel_diff"] <= MAX_REL_DIFF else 1), report


def main(argv=None):
    args = parse_args(argv)
    import mxnet as mx
    # the log (what was followed, misfits, the figure) goes to stderr, stdout keeps the JSON line alone
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[check_pretrained] %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        status, report = run(args)
    except (ValueError, OSError, mx.base.MXNetError) as err:
        print("error: %s" % str(err).strip(), file=sys.stderr)
        return 2
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    print(json.dumps(report), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
