"""Export a legacy MXNet embedding checkpoint to ONNX that runs in ONNX Runtime, checked against MXNet.

    python tools/export_onnx.py --model models/r50/model,1 --output r50.onnx [--batch-size N|dynamic] [--simplify]
    python tools/export_onnx.py --check-backbones r18,mbf --act-types prelu,prelu_conv --batches 1,8

The graph is translated by MXNet 1.9.1's own exporter and repaired for ONNX Runtime (tools/onnx_repair.py). The
result passes ``onnx.checker`` (full check) and is compared with MXNet on the same random faces, batch 1 and 8 of
the one dynamic model (or the fixed batch): every row must have cosine >= 0.99999 and max |difference| <= 1e-4 x
its norm (tools/onnx_check.py). Only then is the file written (atomically). ``--simplify`` adds ONNX Runtime's
basic offline optimisation (constant folding, BN folded into the convs; the result holds standard ONNX ops only)
and checks again. ``--check-backbones`` runs all of this on fresh backbones with trained-like weights and prints
the table of docs/onnx.md.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.onnx_check import CHECK_BATCHES, check_backbones, export_checked, log, markdown_table  # noqa: E402
from tools.onnx_repair import BATCH_DIM, INPUT_NAME, OUTPUT_NAME  # noqa: E402
from utils import cli  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402


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
            print(markdown_table(rows))
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
