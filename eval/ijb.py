"""IJB-B / IJB-C 1:1 template verification (TAR@FAR, ROC, AUC) as InsightFace evaluates it.

    python eval/ijb.py --model models/r100/model,1 --data-dir /data/IJB_release/IJBC --target IJBC
    python eval/ijb.py --onnx model.onnx --data-dir /data/IJB_release/IJBB --target IJBB --json

ROOT (--data-dir) holds meta/{ijbb,ijbc}_face_tid_mid.txt (image template media), meta/..._template_pair_label.txt
(template1 template2 label) and meta/..._name_5pts_score.txt (image x1 y1 ... x5 y5 detector_score), and the
images in loose_crop/. The protocol:
1. every face is aligned: a least-squares similarity transform maps its 5 landmarks onto the ArcFace template
   (ARCFACE_LANDMARKS), and the image is warped to 112 x 112 (black border), RGB;
2. the face and its horizontal flip are embedded (eval/embedding.py), each view L2-normalised, the two added
   (--no-flip: the face alone); the sum keeps its norm unless --no-norm-score, and is multiplied by the
   detector score unless --no-detector-score (InsightFace's default "N1 D1 F2");
3. within a template, the faces of one media are averaged; the template feature is the sum of its media means,
   L2-normalised; a pair scores the cosine of its two template features;
4. the ROC over all pairs (sklearn's ``roc_curve``, as InsightFace); TAR at each FAR of FAR_LEVELS is the TPR of
   the ROC point whose FPR is nearest (ties: the largest TPR), plus the AUC.
Decoding and alignment run in threads while the network embeds. An unreadable image is counted, reported and
scored as a zero feature. Writes <target>_scores.npy (pair scores in pair-file order), <target>_roc.png and
<target>_result.json into --result-dir.
"""
import argparse
import collections
import io
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.embedding import (NORM_EPS, add_model_arguments, check_model_arguments,  # noqa: E402
                            embedder_from_args, model_name)
from utils.fileio import atomic_write_bytes  # noqa: E402

FACE_SIZE = (112, 112)
ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]])      # eyes, nose tip, mouth corners (x, y)
FAR_LEVELS = (("1e-06", 1e-6), ("1e-05", 1e-5), ("1e-04", 1e-4), ("0.001", 1e-3), ("0.01", 1e-2), ("0.1", 1e-1))
TARGETS = ("IJBB", "IJBC")
_GRAM_BLOCK = 1 << 24       # entries (float32) of one block of the template Gram matrix: 64 MB

IJBMeta = collections.namedtuple("IJBMeta", "names templates medias landmarks detector_scores pairs labels")


# ----------------------------------------------------------------------------------------------- meta
def meta_paths(data_dir, target):
    """{'faces', 'pairs', 'landmarks'}: the three meta files of ``target`` (IJBB / IJBC) under ``data_dir``."""
    prefix = os.path.join(data_dir, "meta", target.lower())
    return {"faces": prefix + "_face_tid_mid.txt", "pairs": prefix + "_template_pair_label.txt",
            "landmarks": prefix + "_name_5pts_score.txt"}


def _field_count_error(path, number, width, what, line):
    return ValueError("%s line %d: expected %d fields (%s), found %d: %r"
                      % (path, number, width, what, len(line.split()), line.strip()[:200]))


def _rows(path, width, what):
    """[(line number, fields)] of the non-blank lines of ``path``, each with exactly ``width`` fields."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != width:
                raise _field_count_error(path, number, width, what, line)
            rows.append((number, fields))
    if not rows:
        raise ValueError("%s holds no lines" % path)
    return rows


def _numbers(path, number, fields, kind):
    """``fields`` converted to ``kind`` (int or float), the error naming the file, line and field."""
    values = []
    for field in fields:
        try:
            values.append(kind(field))
        except ValueError:
            raise ValueError("%s line %d: %r is not %s" % (path, number, field,
                                                           "an integer" if kind is int else "a number")) from None
    return values


def _table(path, width, what, kind, named):
    """(names, line numbers, values (N, width - 1) of ``kind``) of the non-blank lines of ``path``, whose first
    field is a name when ``named``; else (None, None, values (N, width)). The numbers go through NumPy's C
    reader (IJB-C has 15.7 M pair lines); only when it fails does a line-by-line pass find and name the bad
    line. Names are read, and field counts checked, by a light pass of their own."""
    if not os.path.isfile(path):
        raise FileNotFoundError("IJB meta file not found: %s" % path)
    names = lines = None
    if named:
        names, lines = [], []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if fields:
                    if len(fields) != width:
                        raise _field_count_error(path, number, width, what, line)
                    names.append(fields[0])
                    lines.append(number)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)            # an empty file: reported below
            warnings.simplefilter("error", DeprecationWarning)      # an integer written as '1.5' is refused
            values = np.loadtxt(path, dtype=np.int64 if kind is int else np.float64, ndmin=2, comments=None,
                                usecols=range(1, width) if named else None)
        if not len(values) or values.shape != (len(names) if named else len(values), width - named):
            raise ValueError("not a table of %d columns" % width)
    except (ValueError, DeprecationWarning):
        rows = _rows(path, width, what)                             # raises, naming the line
        values = np.array([_numbers(path, number, fields[int(named):], kind) for number, fields in rows])
    return names, lines, values


def read_faces(path):
    """(names, templates int64, medias int64, line numbers) of a face_tid_mid file."""
    names, lines, ids = _table(path, 3, "image_name template_id media_id", int, named=True)
    return names, ids[:, 0], ids[:, 1], lines


def read_landmarks(path):
    """(names, landmarks float64 (N, 5, 2), detector scores float64 (N,), line numbers) of a name_5pts_score
    file; landmarks that are not finite or all coincide (no transform fits them) are refused."""
    names, lines, values = _table(path, 12, "image_name x1 y1 ... x5 y5 detector_score", float, named=True)
    landmarks = values[:, :10].reshape(-1, 5, 2)
    spread = np.abs(landmarks - landmarks.mean(1, keepdims=True)).max((1, 2))
    bad = np.flatnonzero(~np.isfinite(values).all(1) | ~(spread > 1e-6))
    if len(bad):
        raise ValueError("%s line %d: the landmarks or score of %s are not finite, or the 5 points coincide"
                         % (path, lines[bad[0]], names[bad[0]]))
    return names, landmarks, values[:, 10], lines


def read_pairs(path):
    """(pairs int64 (P, 2) of template ids, labels int64 (P,) of 0 / 1) of a template_pair_label file."""
    _, _, table = _table(path, 3, "template1 template2 label", int, named=False)
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if len(bad):
        raise ValueError("%s line %d: the label must be 0 or 1, found %d"
                         % (path, _pair_line(path, bad[0]), table[bad[0], 2]))
    return table[:, :2], table[:, 2]


def _pair_line(path, index):
    """The line number of the ``index``-th pair (non-blank line) of ``path``: only needed for an error."""
    with open(path) as f:
        numbers = (number for number, line in enumerate(f, 1) if line.strip())
        return next(n for i, n in enumerate(numbers) if i == index)


def read_meta(data_dir, target):
    """The IJBMeta of ``target`` under ``data_dir``: images in face-list order with their template, media,
    landmarks and detector score, and the pairs. Errors name the file and line."""
    paths = meta_paths(data_dir, target)
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError("IJB meta file not found: %s" % path)
    names, templates, medias, face_lines = read_faces(paths["faces"])
    mark_names, landmarks, scores, mark_lines = read_landmarks(paths["landmarks"])
    if mark_names != names:         # the usual files list the same images in the same order; else join by name
        where = {}
        for name, line in zip(mark_names, mark_lines):
            if name in where:
                raise ValueError("%s line %d: %s already has landmarks (line %d)"
                                 % (paths["landmarks"], line, name, mark_lines[where[name]]))
            where[name] = len(where)
        missing = [i for i, name in enumerate(names) if name not in where]
        if missing:
            raise ValueError("%s line %d: image %s has no landmarks in %s"
                             % (paths["faces"], face_lines[missing[0]], names[missing[0]], paths["landmarks"]))
        order = np.array([where[name] for name in names])
        landmarks, scores = landmarks[order], scores[order]
    pairs, labels = read_pairs(paths["pairs"])
    template_ids = np.unique(templates)
    found = template_ids[np.minimum(np.searchsorted(template_ids, pairs), len(template_ids) - 1)] == pairs
    unknown = np.flatnonzero(~found.all(1))       # (a binary search: np.isin would sort all 31 M ids of IJB-C)
    if len(unknown):
        first = unknown[0]
        template = pairs[first][~found[first]][0]
        raise ValueError("%s line %d: template %d has no images in %s"
                         % (paths["pairs"], _pair_line(paths["pairs"], first), template, paths["faces"]))
    if labels.min() == labels.max():
        raise ValueError("%s: every pair is labelled %d; the ROC needs genuine (1) and impostor (0) pairs"
                         % (paths["pairs"], labels[0]))
    return IJBMeta(names, templates, medias, landmarks, scores, pairs, labels)


# ------------------------------------------------------------------------------------------ alignment
def similarity_matrices(landmarks, template=ARCFACE_LANDMARKS):
    """float64 (N, 2, 3): for each face, the similarity transform (rotation, uniform scale, shift) that maps its
    landmarks (N, K, 2) onto ``template`` (K, 2) with the least squared error. Closed form: with centred points
    p, q the best [[a, -b], [b, a]] has a = sum(p . q) / sum|p|^2, b = sum(p x q) / sum|p|^2."""
    landmarks = np.asarray(landmarks, np.float64)
    src_mean, dst_mean = landmarks.mean(1), template.mean(0)
    src, dst = landmarks - src_mean[:, None], template - dst_mean
    power = np.einsum("nkd,nkd->n", src, src)
    a = np.einsum("nkd,kd->n", src, dst) / power
    b = (src[:, :, 0] * dst[:, 1] - src[:, :, 1] * dst[:, 0]).sum(1) / power
    matrices = np.empty((len(landmarks), 2, 3))
    matrices[:, 0, 0], matrices[:, 0, 1] = a, -b
    matrices[:, 1, 0], matrices[:, 1, 1] = b, a
    matrices[:, :, 2] = dst_mean - np.einsum("nij,nj->ni", matrices[:, :, :2], src_mean)
    return matrices


def align_face(image_bgr, matrix, size=FACE_SIZE):
    """uint8 RGB CHW (3, H, W): ``image_bgr`` (as cv2 reads it) warped by ``matrix`` (2, 3), bilinear, black
    outside the image."""
    face = cv2.warpAffine(image_bgr, matrix, (size[1], size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.cvtColor(face, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)


def load_aligned(paths, matrices, size=FACE_SIZE):
    """(uint8 (n, 3, H, W) aligned faces, bool (n,) readable) for image files ``paths``; an image that cannot
    be read stays black and is marked unreadable."""
    faces = np.zeros((len(paths), 3) + tuple(size), np.uint8)
    readable = np.zeros(len(paths), bool)
    for i, (path, matrix) in enumerate(zip(paths, matrices)):
        try:
            image = cv2.imread(path, cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
        if image is not None and image.size:
            faces[i], readable[i] = align_face(image, matrix, size), True
    return faces, readable


# ------------------------------------------------------------------------------------------ embedding
def embed_images(embedder, paths, matrices, flip=True, workers=None, progress=True, desc="IJB"):
    """(float32 (N, D) per-view-normalised embeddings, bool (N,) readable) of the images ``paths`` aligned by
    ``matrices``; unreadable images get zero rows. Chunks of a batch are decoded and aligned in ``workers``
    threads (cv2 releases the GIL) while the network embeds the previous ones."""
    workers = workers or min(8, os.cpu_count() or 1)
    count, step = len(paths), embedder.batch_size
    features = np.zeros((count, embedder.dim), np.float32)
    readable = np.zeros(count, bool)
    starts = iter(range(0, count, step))
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=count, unit="img", desc=desc, disable=not progress, smoothing=0.05) as bar:
        pending = collections.deque()

        def submit():
            start = next(starts, None)
            if start is not None:
                pending.append((start, pool.submit(load_aligned, paths[start:start + step],
                                                   matrices[start:start + step])))

        for _ in range(2 * workers):        # bounded read-ahead: memory stays a few batches
            submit()
        while pending:
            start, future = pending.popleft()
            faces, ok = future.result()
            submit()
            if ok.any():
                rows = start + np.flatnonzero(ok)
                features[rows] = embedder.embed_batch(faces[ok], flip=flip, normalize_views=True)[0]
            readable[start:start + len(ok)] = ok
            bar.update(len(ok))
    return features, readable


# ------------------------------------------------------------------------------------------ templates
def image_features(embeddings, detector_scores, norm_score=True, detector_score=True):
    """float32 (N, D) the features pooled into templates: ``embeddings`` L2-normalised unless ``norm_score``
    (the norm then weighs the face), times the detector score when ``detector_score``."""
    features = np.array(embeddings, np.float32)
    if not norm_score:
        norms = np.sqrt(np.einsum("ij,ij->i", features, features, dtype=np.float64))
        features /= np.maximum(norms, NORM_EPS).astype(np.float32)[:, None]
    if detector_score:
        features *= np.asarray(detector_scores, np.float32)[:, None]
    return features


def template_features(features, templates, medias):
    """(template ids int64 (T,), ascending; float32 (T, D) unit template features): per template, the mean
    feature of each of its media, summed over the media, L2-normalised (an all-zero template stays zero). One
    sparse product does it: image i weighs 1 / (images of its media in its template) in its template's row."""
    from scipy import sparse
    template_ids, template_rows = np.unique(templates, return_inverse=True)
    _, media_groups, media_sizes = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True,
                                             return_counts=True)
    weights = (1.0 / media_sizes[media_groups.ravel()]).astype(np.float32)
    pooling = sparse.csr_matrix((weights, (template_rows.ravel(), np.arange(len(weights)))),
                                shape=(len(template_ids), len(weights)))
    pooled = np.asarray(pooling @ np.asarray(features, np.float32), np.float32)
    pooled /= np.maximum(np.sqrt(np.einsum("ij,ij->i", pooled, pooled, dtype=np.float64)), NORM_EPS
                         ).astype(np.float32)[:, None]
    return template_ids, pooled


def pair_scores(template_ids, template_feats, pairs):
    """float32 (P,) cosine of the two templates of every pair (template ids looked up in ascending
    ``template_ids``). Pairs are grouped by their first template; a block of first templates whose pairs are
    dense gets its whole row of the Gram matrix from one oneDNN product (IJB-C: 15.7 M pairs over 23 k
    templates), a sparse one gathers its pairs' features."""
    import mxnet as mx
    rows = np.searchsorted(template_ids, pairs)
    order = np.argsort(rows[:, 0], kind="stable")
    first = rows[order, 0]
    count = len(template_ids)
    step = max(1, _GRAM_BLOCK // count)
    scores = np.empty(len(pairs), np.float32)
    every = mx.nd.array(template_feats)
    for start in range(0, count, step):
        low, high = np.searchsorted(first, [start, start + step])
        chosen = order[low:high]
        a, b = rows[chosen, 0], rows[chosen, 1]
        # few pairs: gathering their rows beats the block product (and stays under 2 x 128 MB)
        if len(chosen) < min(65536, min(step, count - start) * count / 64):
            scores[chosen] = np.einsum("ij,ij->i", template_feats[a], template_feats[b])
        elif len(chosen):
            block = mx.nd.FullyConnected(every[start:start + step], every, no_bias=True, num_hidden=count)
            scores[chosen] = block.asnumpy()[a - start, b]
    return scores


# ------------------------------------------------------------------------------------------------ ROC
def roc_table(labels, scores):
    """(fpr, tpr, auc, {FAR label: TAR}) of the pair ``scores`` (higher: more alike) against ``labels`` (1:
    genuine). The ROC is sklearn's ``roc_curve`` as InsightFace reads it; each TAR is the TPR at the ROC point
    whose FPR is nearest to the FAR level, the largest TPR when several are equally near."""
    from sklearn.metrics import auc, roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    table = {}
    for key, far in FAR_LEVELS:
        gap = np.abs(fpr - far)
        table[key] = float(tpr[np.flatnonzero(gap == gap.min())[-1]])     # fpr, tpr ascend: the last is largest
    return fpr, tpr, float(auc(fpr, tpr)), table


def plot_roc(fpr, tpr, table, path, title):
    """Write the ROC (log-scale FAR) with the TAR@FAR points marked as a PNG at ``path``, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    fig, ax = plt.subplots(figsize=(6, 4.5))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.11, top=0.92)
    ax.plot(fpr, tpr, lw=1.2, label="ROC")
    levels = [far for _, far in FAR_LEVELS] + [1.0]
    ax.plot(levels[:-1], [table[key] for key, _ in FAR_LEVELS], "o", ms=4, label="TAR@FAR")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    # plain tick labels: the default log-scale ones go through mathtext, which takes seconds to lay out
    ax.set_xticks(levels, ["%g" % far for far in levels])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ run
def image_dir(data_dir):
    """``data_dir``/loose_crop, where the images are; FileNotFoundError when it is missing."""
    folder = os.path.join(data_dir, "loose_crop")
    if not os.path.isdir(folder):
        raise FileNotFoundError("IJB image folder not found: %s" % folder)
    return folder


def evaluate_ijb(embedder, data_dir, target, meta=None, flip=True, norm_score=True, detector_score=True,
                 workers=None, progress=True):
    """Run the protocol on ``target`` under ``data_dir`` (``meta``: its read_meta, when already read); returns
    the result dict (what --json prints) plus 'scores', 'fpr', 'tpr' arrays and 'unreadable' (the names of the
    images that could not be read)."""
    meta = read_meta(data_dir, target) if meta is None else meta
    folder = image_dir(data_dir)
    paths = [os.path.join(folder, name) for name in meta.names]
    embeddings, readable = embed_images(embedder, paths, similarity_matrices(meta.landmarks), flip, workers,
                                        progress, desc=target)
    if not readable.any():
        raise ValueError("none of the %d images under %s could be read" % (len(paths), folder))
    features = image_features(embeddings, meta.detector_scores, norm_score, detector_score)
    template_ids, template_feats = template_features(features, meta.templates, meta.medias)
    scores = pair_scores(template_ids, template_feats, meta.pairs)
    fpr, tpr, auc, table = roc_table(meta.labels, scores)
    return {"target": target, "num_images": len(paths), "num_unreadable": int((~readable).sum()),
            "num_templates": len(template_ids), "num_pairs": len(scores),
            "num_genuine_pairs": int(meta.labels.sum()), "flip": flip, "norm_score": norm_score,
            "detector_score": detector_score, "auc": auc, "tar_at_far": table,
            "scores": scores, "fpr": fpr, "tpr": tpr,
            "unreadable": [name for name, ok in zip(meta.names, readable) if not ok]}


def format_table(result):
    """The readable report: counts, then TAR (%) at every FAR level and the AUC."""
    keys = [key for key, _ in FAR_LEVELS]
    widths = [max(6, len(key)) for key in keys]
    lines = ["%s: %d images (%d unreadable), %d templates, %d pairs (%d genuine)"
             % (result["target"], result["num_images"], result["num_unreadable"], result["num_templates"],
                result["num_pairs"], result["num_genuine_pairs"]),
             "FAR     | " + " | ".join(key.rjust(w) for key, w in zip(keys, widths)) + " | AUC",
             "--------+-" + "-+-".join("-" * w for w in widths) + "-+-------",
             "TAR (%) | " + " | ".join(("%.2f" % (100 * result["tar_at_far"][key])).rjust(w)
                                       for key, w in zip(keys, widths)) + " | %.5f" % result["auc"]]
    return "\n".join(lines)


def write_results(result, result_dir, title):
    """<target>_scores.npy, <target>_roc.png and <target>_result.json into ``result_dir``, each atomically."""
    stem = os.path.join(result_dir, result["target"].lower())
    buffer = io.BytesIO()
    np.save(buffer, result["scores"])
    atomic_write_bytes(stem + "_scores.npy", buffer.getvalue())
    plot_roc(result["fpr"], result["tpr"], result["tar_at_far"], stem + "_roc.png", title)
    atomic_write_bytes(stem + "_result.json", (json.dumps(public(result), indent=1) + "\n").encode())


def public(result):
    """The JSON-friendly part of ``result`` (no arrays)."""
    return {k: v for k, v in result.items() if k not in ("scores", "fpr", "tpr", "unreadable")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="IJB-B / IJB-C 1:1 verification (TAR@FAR, AUC) of a legacy MXNet "
                                                 "checkpoint or an ONNX model.")
    add_model_arguments(parser)
    parser.add_argument("--data-dir", required=True, help="the IJB root: meta/ and loose_crop/")
    parser.add_argument("--target", required=True, type=str.upper, choices=TARGETS, help="IJBC or IJBB")
    parser.add_argument("--no-flip", action="store_true", help="embed the image only, not its flip too")
    parser.add_argument("--no-norm-score", action="store_true",
                        help="L2-normalise each image feature (drop the norm as a quality weight)")
    parser.add_argument("--no-detector-score", action="store_true", help="do not weigh faces by detector score")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="decoding / alignment threads (default %(default)s)")
    parser.add_argument("--result-dir", default="ijb_results",
                        help="folder for the scores, ROC plot and result JSON (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the table then goes to stderr)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after printing an error)."""
    args = parse_args(argv)
    import mxnet as mx
    from utils.blas_check import warn_if_generic_blas
    warn_if_generic_blas()              # the metrics run numpy products
    try:
        if args.workers < 1:
            raise ValueError("--workers must be >= 1, got %d" % args.workers)
        check_model_arguments(args)
        meta = read_meta(args.data_dir, args.target)    # bad meta files fail before the model loads
        image_dir(args.data_dir)
        embedder = embedder_from_args(args, FACE_SIZE)
        result = evaluate_ijb(embedder, args.data_dir, args.target, meta, flip=not args.no_flip,
                              norm_score=not args.no_norm_score, detector_score=not args.no_detector_score,
                              workers=args.workers)
        result["model"] = model_name(args)
        write_results(result, args.result_dir, "%s on %s" % (result["model"], args.target))
    except (OSError, ValueError, mx.base.MXNetError) as error:
        print("error: %s" % error, file=sys.stderr)
        return 1
    if result["unreadable"]:
        print("warning: %d of %d images could not be read and count as zero features: %s%s"
              % (len(result["unreadable"]), result["num_images"], ", ".join(result["unreadable"][:5]),
                 ", ..." if len(result["unreadable"]) > 5 else ""), file=sys.stderr)
    table = format_table(result)
    print(table, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(public(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
