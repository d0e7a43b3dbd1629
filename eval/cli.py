"""The start-up both evaluation CLIs (eval/verification.py, eval/ijb.py) share: the --model / --onnx / --batch-size
/ --ctx arguments and their checks, the MXNet context, the embedder they ask for, logging, the OpenBLAS warning,
and utils/cli.py's rule for user errors (one line naming the file or value, exit status 1)."""
import logging
import os

from eval.embedding import Embedder, checkpoint_files
from utils import cli
from utils.blas_check import warn_if_generic_blas


def add_model_arguments(parser):
    """--model PREFIX,EPOCH | --onnx FILE (exactly one), --batch-size and --ctx."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="legacy MXNet checkpoint PREFIX,EPOCH (PREFIX-symbol.json, PREFIX-%%04d.params)")
    model.add_argument("--onnx", metavar="FILE", help="an ONNX model (raw RGB 0..255 NCHW in, embedding out)")
    parser.add_argument("--batch-size", type=cli.int_at_least(1), default=64,
                        help="faces per forward pass (default %(default)s)")
    parser.add_argument("--ctx", default="cpu", help="cpu, gpu or gpu:N, for --model (default %(default)s)")


def model_name(args):
    """What the --model / --onnx arguments name, for reports."""
    return args.model if args.model else args.onnx


def parse_context(text):
    """'cpu', 'gpu' or 'gpu:N' -> an MXNet context; a clear error when MXNet sees no such GPU."""
    import mxnet as mx
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return mx.cpu()
    if kind == "gpu" and (not index or index.isdigit()):
        index = int(index or 0)
        if index >= mx.context.num_gpus():
            raise ValueError("--ctx %s: MXNet sees %d GPU(s)" % (text, mx.context.num_gpus()))
        return mx.gpu(index)
    raise ValueError("--ctx must be cpu, gpu or gpu:N, got %r" % text)


def check_model_arguments(args):
    """Fail fast, before anything is loaded, on a bad context or a missing model file (--batch-size is checked
    when it is parsed)."""
    if args.model:
        parse_context(args.ctx)
        checkpoint_files(args.model)
    elif not os.path.isfile(args.onnx):
        raise FileNotFoundError("ONNX model not found: %s" % args.onnx)


def embedder_from_args(args, image_size=(112, 112)):
    """The Embedder the --model / --onnx arguments ask for (the model is loaded and bound: a damaged or unfitting
    model fails here, naming its file)."""
    if args.model:
        return Embedder.from_checkpoint(args.model, ctx=parse_context(args.ctx), batch_size=args.batch_size,
                                        image_size=image_size)
    return Embedder.from_onnx(args.onnx, batch_size=args.batch_size, image_size=image_size)


def run(body, prog):
    """Run an evaluation CLI's ``body()`` (returns its exit status): log lines to stderr, MXNet loaded, the
    OpenBLAS warning (the metrics run numpy products), then utils/cli.py's handling of user errors."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import mxnet  # noqa: F401 - loads MXNet's OpenBLAS, which the warning inspects too
    warn_if_generic_blas(logging.getLogger(prog))
    return cli.run(body, prog)
