"""IJB-B / IJB-C 1:1 template verification (TAR@FAR, ROC, AUC) as InsightFace evaluates it.

    python eval/ijb.py --model models/r100/model,1 --data-dir /data/IJB_release/IJBC --target IJBC
    python eval/ijb.py --onnx model.onnx --data-dir /data/IJB_release/IJBB --target IJBB --json

ROOT (--data-dir) holds the meta files and the images in loose_crop/ (eval/ijb_data.py reads them). The protocol:
1. every face is aligned onto the ArcFace landmark template (eval/ijb_data.py), 112 x 112 RGB;
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import cli  # noqa: E402
from eval.embedding import NORM_EPS  # noqa: E402
from eval.ijb_data import (FACE_SIZE, TARGETS, check_meta_files, image_dir, load_aligned, read_meta,  # noqa: E402
                           similarity_matrices)
from utils.cli import check_output_dir, int_at_least  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402

FAR_LEVELS = (("1e-06", 1e-6), ("1e-05", 1e-5), ("1e-04", 1e-4), ("0.001", 1e-3), ("0.01", 1e-2), ("0.1", 1e-1))
_GRAM_BLOCK = 1 << 24       # entries (float32) of one block of the template Gram matrix: 64 MB


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
    cli.add_model_arguments(parser)
    parser.add_argument("--data-dir", required=True, help="the IJB root: meta/ and loose_crop/")
    parser.add_argument("--target", required=True, type=str.upper, choices=TARGETS, help="IJBC or IJBB")
    parser.add_argument("--no-flip", action="store_true", help="embed the image only, not its flip too")
    parser.add_argument("--no-norm-score", action="store_true",
                        help="L2-normalise each image feature (drop the norm as a quality weight)")
    parser.add_argument("--no-detector-score", action="store_true", help="do not weigh faces by detector score")
    parser.add_argument("--workers", type=int_at_least(1), default=min(8, os.cpu_count() or 1),
                        help="decoding / alignment threads (default %(default)s)")
    parser.add_argument("--result-dir", default="ijb_results",
                        help="folder for the scores, ROC plot and result JSON (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the table then goes to stderr)")
    return parser.parse_args(argv)


def run(args):
    """The CLI's work; returns the exit status. The model, the meta files, the image folder and the result folder
    are checked before the first image is read."""
    cli.check_model_arguments(args)
    check_output_dir(args.result_dir, "--result-dir")
    check_meta_files(args.data_dir, args.target)
    image_dir(args.data_dir)
    embedder = cli.embedder_from_args(args, FACE_SIZE)          # a damaged model fails before the meta reading
    meta = read_meta(args.data_dir, args.target)
    result = evaluate_ijb(embedder, args.data_dir, args.target, meta, flip=not args.no_flip,
                          norm_score=not args.no_norm_score, detector_score=not args.no_detector_score,
                          workers=args.workers)
    result["model"] = cli.model_name(args)
    write_results(result, args.result_dir, "%s on %s" % (result["model"], args.target))
    if result["unreadable"]:
        print("warning: %d of %d images could not be read and count as zero features: %s%s"
              % (len(result["unreadable"]), result["num_images"], ", ".join(result["unreadable"][:5]),
                 ", ..." if len(result["unreadable"]) > 5 else ""), file=sys.stderr)
    print(format_table(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(public(result)))
    return 0


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after printing a one-line error)."""
    args = parse_args(argv)
    return cli.run(lambda: run(args), "ijb")


if __name__ == "__main__":
    sys.exit(main())
