"""Face verification on InsightFace ``.bin`` sets (LFW, CFP-FP, AgeDB-30, ...) with the protocol papers report.

    python eval/verification.py --model models/r50/model,1 --data-dir data/faces_emore --target lfw,cfp_fp,agedb_30
    python eval/verification.py --onnx model.onnx --data-dir data/faces_emore --target lfw

A ``.bin`` is a pickle of ``(images, issame)``: 2P encoded aligned faces (pair i is images 2i and 2i+1) and P
booleans. Every image and its horizontal flip are embedded and the two embeddings summed; the sums are
L2-normalised and each pair is scored by the squared Euclidean distance of its two embeddings ("same" when
the distance is below a threshold); eval/embedding.py embeds (MXNet checkpoint or ONNX). Reported per set:
    accuracy    10-fold, folds in order: the best of the thresholds 0.00, 0.01, ..., 3.99 on 9 folds is applied
                to the 10th (mean and std of the 10 held-out accuracies)
    val         TAR at FAR = 1e-3 on the same folds: thresholds 0.000, 0.001, ..., 3.999; the threshold with FAR
                1e-3 on the 9 training folds is interpolated linearly between the last threshold whose FAR is
                <= 1e-3 and the next one, and the true-accept rate is measured at it on the held-out fold
    auc         ROC AUC over all pairs (score = -distance)
    xnorm       mean L2 norm of the single-view embeddings (each image and its flip) before summing, as InsightFace
"""
import argparse
import json
import os
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import cli  # noqa: E402
from utils.cli import image_size, int_at_least  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3
DEFAULT_TARGETS = "lfw,cfp_fp,agedb_30"
_DECODE_CHUNK = 256         # images per decoding task


# ------------------------------------------------------------------------------------------- .bin files
class _BinUnpickler(pickle.Unpickler):
    """Unpickles only what a .bin holds (lists, tuples, bytes, bools, and the numpy bools / byte arrays some
    converters write): any other global is refused, so opening a hostile file cannot run code."""

    ALLOWED = {("_codecs", "encode"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
               ("numpy", "dtype"), ("numpy", "ndarray"),
               ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError("it refers to %s.%s, which a .bin never holds" % (module, name))
        return super().find_class(module, name)


def _as_flags(values, where):
    """``values`` (bools, numpy bools or 0/1 integers) as a 1-d np.bool_ array; errors name the first bad index."""
    flags = np.asarray(values)
    if flags.ndim != 1:
        raise ValueError("%s: issame must be a flat list of booleans, found shape %s" % (where, flags.shape))
    if flags.dtype == np.bool_:
        return flags
    if flags.dtype.kind in "iu":
        bad = np.flatnonzero((flags != 0) & (flags != 1))
    else:
        bad = [i for i, v in enumerate(values) if not isinstance(v, (bool, np.bool_))]
    if len(bad):
        raise ValueError("%s: issame[%d] is %r, not a boolean" % (where, bad[0], values[bad[0]]))
    return flags.astype(np.bool_)


def _encoded_bytes(data, where):
    """The encoded image ``data`` as a flat uint8 array (bytes, bytearray, memoryview or uint8 array)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        buffer = np.frombuffer(data, np.uint8)
    elif isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        buffer = data
    else:
        raise ValueError("%s is a %s, not encoded image bytes" % (where, type(data).__name__))
    if buffer.size == 0:
        raise ValueError("%s is empty" % where)
    return buffer


def decode_image(data, image_size, where):
    """Decode one encoded face to uint8 RGB CHW; ``where`` (file and index) starts every error message."""
    image = cv2.imdecode(_encoded_bytes(data, where), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("%s cannot be decoded as an image (corrupt or not a JPEG/PNG)" % where)
    if image.shape[:2] != tuple(image_size):
        raise ValueError("%s is %dx%d (HxW), expected %dx%d aligned faces"
                         % ((where,) + image.shape[:2] + tuple(image_size)))
    return image[:, :, ::-1].transpose(2, 0, 1)        # cv2 decodes BGR HWC


def load_bin(path, image_size=(112, 112), workers=None):
    """Read a .bin verification set: ``(images, issame)`` with images np.uint8 (2P, 3, H, W) RGB and issame
    np.bool_ (P,). Python-2 pickles load too (``encoding='bytes'``). Errors name the file and the (first bad)
    index. ``workers`` decoding threads (default: up to 8, one per CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError("verification set not found: %s" % path)
    try:
        with open(path, "rb") as f:
            content = _BinUnpickler(f, encoding="bytes").load()
    except MemoryError:
        raise
    except Exception as error:      # a damaged pickle raises any of a dozen exception types
        raise ValueError("%s is not a .bin verification set (a pickle of (images, issame)): %s: %s"
                         % (path, type(error).__name__, error)) from error
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise ValueError("%s holds a %s, not the pair (images, issame) of a .bin" % (path, type(content).__name__))
    bins, issame = content
    if not isinstance(bins, (list, tuple)):
        raise ValueError("%s: the images are a %s, not a list of encoded images" % (path, type(bins).__name__))
    if len(bins) % 2:
        raise ValueError("%s holds an odd number of images (%d); a .bin stores 2 images per pair" % (path, len(bins)))
    issame = _as_flags(issame, path)
    if len(issame) != len(bins) // 2:
        raise ValueError("%s: %d images make %d pairs but issame has %d entries"
                         % (path, len(bins), len(bins) // 2, len(issame)))
    height, width = image_size
    images = np.empty((len(bins), 3, height, width), np.uint8)

    def decode_range(start):
        for index in range(start, min(start + _DECODE_CHUNK, len(bins))):
            images[index] = decode_image(bins[index], image_size, "%s image %d (pair %d)" % (path, index, index // 2))

    # cv2.imdecode releases the GIL: threads scale; results are taken in order, so the first bad index is named
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for done in [pool.submit(decode_range, start) for start in range(0, len(bins), _DECODE_CHUNK)]:
            done.result()
    return images, issame


def write_bin(path, jpeg_list, issame_list):
    """Write a .bin (the container ``load_bin`` reads) atomically: ``jpeg_list`` holds 2P encoded images,
    pair i being items 2i and 2i+1, ``issame_list`` P booleans. The images are stored as given."""
    if len(jpeg_list) % 2:
        raise ValueError("%s: an odd number of images (%d); a .bin stores 2 images per pair" % (path, len(jpeg_list)))
    flags = _as_flags(list(issame_list), path)
    if len(flags) != len(jpeg_list) // 2:
        raise ValueError("%s: %d images make %d pairs but issame has %d entries"
                         % (path, len(jpeg_list), len(jpeg_list) // 2, len(flags)))
    bins = [_encoded_bytes(data, "%s image %d" % (path, i)).tobytes() for i, data in enumerate(jpeg_list)]
    atomic_write_bytes(path, pickle.dumps((bins, [bool(v) for v in flags]), protocol=4))


# ---------------------------------------------------------------------------------------------- metrics
def _count_below(values, thresholds):
    """For every threshold t, how many of ``values`` are < t."""
    return np.searchsorted(np.sort(values), thresholds, side="left")


def _rates(dist, issame, thresholds):
    """(true accepts, false accepts, same pairs, different pairs) at every threshold (accept: dist < t)."""
    true_accepts = _count_below(dist[issame], thresholds)
    false_accepts = _count_below(dist[~issame], thresholds)
    return true_accepts, false_accepts, int(issame.sum()), int((~issame).sum())


def _accuracies(dist, issame, thresholds):
    true_accepts, false_accepts, _, n_diff = _rates(dist, issame, thresholds)
    return (true_accepts + n_diff - false_accepts) / len(dist)


def _far_threshold(dist, issame, far_target):
    """The distance threshold at which the false-accept rate on (dist, issame) is ``far_target``, interpolated
    between VAL_THRESHOLDS; 0 when even the largest threshold stays below the target."""
    _, false_accepts, _, n_diff = _rates(dist, issame, VAL_THRESHOLDS)
    if n_diff == 0:
        return 0.0
    far = false_accepts / n_diff                        # non-decreasing in the threshold, far[0] == 0
    if far[-1] < far_target:
        return 0.0
    low = int(np.searchsorted(far, far_target, side="right")) - 1     # last threshold with far <= target
    if low == len(far) - 1:
        return float(VAL_THRESHOLDS[low])
    step = (far_target - far[low]) / (far[low + 1] - far[low])
    return float(VAL_THRESHOLDS[low] + step * (VAL_THRESHOLDS[low + 1] - VAL_THRESHOLDS[low]))


def check_folds(issame, nfolds):
    """ValueError unless the pairs ``issame`` can be split into ``nfolds`` folds and hold both kinds of pair."""
    if not 2 <= nfolds <= len(issame):
        raise ValueError("nfolds must be in [2, number of pairs = %d], got %d" % (len(issame), nfolds))
    if issame.all() or not issame.any():
        raise ValueError("issame must hold both same and different pairs")


def pair_distances(embeddings):
    """Squared Euclidean distance between the L2-normalised embeddings 2i and 2i+1, float64 (P,)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.sum(np.square(unit[0::2] - unit[1::2]), axis=1)


def evaluate(embeddings, issame, nfolds=10, far_target=FAR_TARGET, xnorm=None):
    """Verification metrics of flip-summed raw ``embeddings`` (2P, D) for pairs ``issame`` (P,):
    {accuracy, accuracy_std, val, val_std, far, auc, xnorm, threshold} as Python floats (``threshold``: the mean
    of the folds' best accuracy thresholds). ``xnorm``: the figure to report (``Embedder.last_xnorm``, the mean
    single-view norm papers print); by default the mean norm of ``embeddings`` themselves."""
    from sklearn.metrics import roc_auc_score
    embeddings = np.asarray(embeddings, np.float64)
    issame = _as_flags(issame, "evaluate")
    pairs = len(issame)
    if embeddings.ndim != 2 or len(embeddings) != 2 * pairs:
        raise ValueError("need 2 embeddings per pair: %d pairs, embeddings of shape %s" % (pairs, embeddings.shape))
    check_folds(issame, nfolds)
    if not 0 < far_target <= 1:
        raise ValueError("far_target must be in (0, 1], got %r" % (far_target,))
    norms = np.linalg.norm(embeddings, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise ValueError("embedding %d is %s; cannot normalise it"
                         % (bad[0], "all zeros" if norms[bad[0]] == 0 else "not finite"))
    dist = pair_distances(embeddings)

    accuracy, best, val, far = (np.empty(nfolds) for _ in range(4))
    for fold, test in enumerate(np.array_split(np.arange(pairs), nfolds)):    # = KFold(nfolds, shuffle=False)
        train = np.ones(pairs, bool)
        train[test] = False
        best[fold] = ACCURACY_THRESHOLDS[np.argmax(_accuracies(dist[train], issame[train], ACCURACY_THRESHOLDS))]
        accuracy[fold] = _accuracies(dist[test], issame[test], best[fold:fold + 1])[0]
        threshold = _far_threshold(dist[train], issame[train], far_target)
        accepts, false_accepts, n_same, n_diff = _rates(dist[test], issame[test], [threshold])
        val[fold] = accepts[0] / n_same if n_same else np.nan          # a fold without same pairs has no VAL
        far[fold] = false_accepts[0] / n_diff if n_diff else np.nan
    with np.errstate(invalid="ignore"):
        return {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
                "val": float(np.nanmean(val)), "val_std": float(np.nanstd(val)), "far": float(np.nanmean(far)),
                "auc": float(roc_auc_score(issame, -dist)),
                "xnorm": float(norms.mean() if xnorm is None else xnorm),
                "threshold": float(best.mean())}


def verify(embedder, datasets, nfolds=10, progress=False):
    """{name: evaluate(...)} for ``datasets`` {name: (images, issame)} embedded with ``embedder`` (an Embedder);
    ``progress`` shows a tqdm bar per set."""
    results = {}
    for name, (images, issame) in datasets.items():
        with tqdm(total=len(images), desc=name, unit="img", disable=not progress, leave=False) as bar:
            embeddings = embedder.embed(images, progress=bar.update)
        try:
            results[name] = evaluate(embeddings, issame, nfolds, xnorm=getattr(embedder, "last_xnorm", None))
        except ValueError as error:
            raise ValueError("verification set %s: %s" % (name, error)) from error
    return results


# -------------------------------------------------------------------------------------------------- CLI
def format_table(results, pair_counts):
    """The readable table: set | pairs | accuracy ± std | VAL@FAR=1e-3 | AUC | XNorm (rates in %)."""
    header = ("set", "pairs", "accuracy ± std (%)", "VAL@FAR=1e-3 (%)", "AUC", "XNorm")
    rows = [(name, str(pair_counts[name]),
             "%.3f ± %.3f" % (100 * r["accuracy"], 100 * r["accuracy_std"]),
             "%.3f ± %.3f" % (100 * r["val"], 100 * r["val_std"]), "%.5f" % r["auc"], "%.4g" % r["xnorm"])
            for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Verification accuracy of a legacy MXNet checkpoint or an ONNX "
                                                 "model on .bin sets (10-fold accuracy, VAL@FAR=1e-3, AUC, XNorm).")
    cli.add_model_arguments(parser)
    parser.add_argument("--data-dir", required=True, help="folder holding the sets as NAME.bin")
    parser.add_argument("--target", default=DEFAULT_TARGETS, help="comma-separated set names (default %(default)s)")
    parser.add_argument("--image-size", type=image_size, default=(112, 112), help="H,W of the faces (default 112,112)")
    parser.add_argument("--nfolds", type=int_at_least(2), default=10,
                        help="cross-validation folds (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the table then goes to stderr)")
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.target.split(",") if n.strip()]
    if not args.names:
        parser.error("--target names no set")
    return args


def run(args):
    """The CLI's work; returns the exit status. Every check that needs no embedding (model files, sets, folds)
    runs before the first face is embedded."""
    cli.check_model_arguments(args)
    paths = {name: os.path.join(args.data_dir, name + ".bin") for name in args.names}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError("verification set(s) not found: %s" % ", ".join(missing))
    embedder = cli.embedder_from_args(args, args.image_size)        # a damaged model fails before the loading
    datasets = {}
    for name, path in paths.items():
        begin = time.time()
        datasets[name] = load_bin(path, args.image_size)
        try:
            check_folds(datasets[name][1], args.nfolds)
        except ValueError as error:
            raise ValueError("%s: %s" % (path, error)) from None
        print("loaded %s: %d pairs in %.1f s" % (name, len(datasets[name][1]), time.time() - begin), file=sys.stderr)
    results = verify(embedder, datasets, nfolds=args.nfolds, progress=True)
    table = format_table(results, {name: len(issame) for name, (_, issame) in datasets.items()})
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({"model": cli.model_name(args), "sets": {
            name: dict(pairs=len(datasets[name][1]), **metrics) for name, metrics in results.items()}}))
    else:
        print(table)
    return 0


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after printing a one-line error)."""
    args = parse_args(argv)
    return cli.run(lambda: run(args), "verification")


if __name__ == "__main__":
    sys.exit(main())
