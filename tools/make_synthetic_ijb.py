"""Write a small IJB-B / IJB-C-layout set of synthetic people, to run eval/ijb.py end to end without IJB.

    python tools/make_synthetic_ijb.py OUT_DIR --first-identity 400 --identities 100 [--target IJBC]

The people are tools/make_synthetic.py's: the same --seed draws identity number k the same way. Start
--first-identity past the training set's identities (and its holdout) to get people training never saw.

Per identity: --templates templates, each holding 1..--media media; a media is a still (one image) or, with
probability --video, a video of 2..--frames frames. A media is one view of the face, drawn like a training image
(expression, shift, scale, rotation, light, blur, noise) and, like the training faces, taken to be aligned: its
5 landmarks are the ArcFace template points. Each image places that view in a larger loose-crop frame with its
own random similarity (scale in --scale, rotation up to --rotate degrees, shift), so the frames of a video
differ; the landmarks written are the template points moved by the placement, plus --landmark-noise. A
--low-quality fraction of the images is downsampled 3-5x and gets a detector score in [0.3, 0.7); the others
score in [0.8, 1.0).
Pairs: every two templates of one identity (genuine, label 1) and --impostors random pairs of templates of two
different identities (label 0; 0 = all of them), in a seeded random order.

Writes OUT_DIR/loose_crop/<n>.jpg, then OUT_DIR/meta/<target>_face_tid_mid.txt, <target>_name_5pts_score.txt
and <target>_template_pair_label.txt (each atomically). The output is a function of the arguments (--seed),
not of --workers.
"""
import argparse
import functools
import logging
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.ijb_data import ARCFACE_LANDMARKS, TARGETS, meta_paths  # noqa: E402
from utils import cli  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402
from recognition.data import rec_format  # noqa: E402
from tools.make_synthetic import DEFAULT_AUG, SIZE, augment, identity_params, render_face, texture_field  # noqa: E402
from tools.pack_rec import ordered_map  # noqa: E402

log = logging.getLogger("make_synthetic_ijb")
_LAYOUT, _MEDIA, _FRAME, _NOISE, _PAIRS = 10, 11, 12, 13, 14      # seed streams (make_synthetic uses 0-3)


def layout(seed, identity, templates, media, frames, video):
    """[(template, media, frame count)] of one identity: a pure function of the arguments."""
    rng = np.random.default_rng([seed, _LAYOUT, identity])
    out = []
    for template in range(templates):
        for medium in range(int(rng.integers(1, media + 1))):
            count = int(rng.integers(2, frames + 1)) if frames > 1 and rng.random() < video else 1
            out.append((template, medium, count))
    return out


def _drawing(seed, identity, spread=1.0):
    """What every view of ``identity`` is drawn from: (parameters, texture field, noise pool)."""
    params = identity_params(seed, identity, spread)
    noise_pool = np.random.default_rng([seed, _NOISE, identity]).standard_normal((2 * SIZE, 2 * SIZE, 3),
                                                                                 dtype=np.float32)
    return params, texture_field(params), noise_pool


def media_view(seed, identity, template, medium, aug=None, drawing=None):
    """The aligned RGB (SIZE, SIZE, 3) view shared by the frames of one media (``drawing``: the identity's
    ``_drawing``, when already made)."""
    aug = dict(DEFAULT_AUG, **(aug or {}))
    params, field, noise_pool = drawing or _drawing(seed, identity)
    rng = np.random.default_rng([seed, _MEDIA, identity, template, medium])
    return augment(render_face(params, rng, aug["expression"], field), rng, aug, noise_pool)


def place(view, rng, scale, rotate, landmark_noise, low_quality):
    """(RGB loose-crop frame, landmarks (5, 2), detector score): ``view`` scaled, rotated and shifted into a
    larger frame filled with the colour of the view's border."""
    s = rng.uniform(*scale)
    width, height = (int(round(SIZE * s * rng.uniform(1.4, 1.9))) for _ in range(2))
    placement = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), rng.uniform(-rotate, rotate), s)
    placement[:, 2] += np.array([width, height]) / 2 - SIZE / 2 + rng.uniform(-0.1, 0.1, 2) * SIZE * s
    ring = np.concatenate([view[:4].reshape(-1, 3), view[-4:].reshape(-1, 3),
                           view[:, :4].reshape(-1, 3), view[:, -4:].reshape(-1, 3)])
    background = tuple(float(v) for v in ring.mean(0))
    frame = cv2.warpAffine(view, placement, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=background)
    landmarks = ARCFACE_LANDMARKS @ placement[:, :2].T + placement[:, 2]
    landmarks += rng.normal(0, landmark_noise * s, landmarks.shape)
    if rng.random() < low_quality:
        factor = rng.uniform(3, 5)
        small = cv2.resize(frame, (max(1, int(width / factor)), max(1, int(height / factor))),
                           interpolation=cv2.INTER_AREA)
        frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        score = rng.uniform(0.3, 0.7)
    else:
        score = rng.uniform(0.8, 1.0)
    return frame, landmarks, float(score)


def identity_images(identities, seed, templates, media, frames, video, scale, rotate, landmark_noise, low_quality,
                    quality, aug, spread=1.0):
    """For each identity of ``identities``: [(template, media, JPEG bytes, landmarks (5, 2), detector score)]."""
    out = []
    for identity in identities:
        drawing = _drawing(seed, identity, spread)
        images = []
        for template, medium, count in layout(seed, identity, templates, media, frames, video):
            view = media_view(seed, identity, template, medium, aug, drawing)
            for frame_index in range(count):
                rng = np.random.default_rng([seed, _FRAME, identity, template, medium, frame_index])
                frame, landmarks, score = place(view, rng, scale, rotate, landmark_noise, low_quality)
                images.append((template, medium, rec_format.encode_image(frame, "jpg", quality), landmarks, score))
        out.append(images)
    return out


def make_pairs(template_identity, impostors, seed):
    """int64 (P, 3) rows (template index a, template index b, label): every genuine pair and ``impostors`` random
    impostor pairs (0: all), shuffled."""
    a, b = np.triu_indices(len(template_identity), k=1)
    same = template_identity[a] == template_identity[b]
    rng = np.random.default_rng([seed, _PAIRS])
    impostor = np.flatnonzero(~same)
    if impostors and impostors < len(impostor):
        impostor = np.sort(rng.choice(impostor, impostors, replace=False))
    chosen = np.concatenate([np.flatnonzero(same), impostor])
    rows = np.stack([a[chosen], b[chosen], same[chosen].astype(np.int64)], 1)
    return rows[rng.permutation(len(rows))]


def make_ijb(out_dir, first_identity, identities, target="IJBC", templates=3, media=3, frames=3, video=0.3,
             impostors=0, scale=(0.7, 1.5), rotate=20.0, landmark_noise=1.0, low_quality=0.15, seed=0, quality=90,
             aug=None, workers=None, progress=True, spread=1.0):
    """Write the set into ``out_dir``; returns a summary dict."""
    from tqdm import tqdm
    if identities < 2 or templates < 2 or media < 1 or frames < 1 or impostors < 0:
        raise ValueError("need >= 2 identities, >= 2 templates each (genuine pairs), >= 1 media and frames and "
                         ">= 0 impostors, got %d, %d, %d, %d, %d" % (identities, templates, media, frames, impostors))
    workers = os.cpu_count() if workers is None else workers
    image_dir = os.path.join(out_dir, "loose_crop")
    os.makedirs(image_dir, exist_ok=True)
    work = functools.partial(identity_images, seed=seed, templates=templates, media=media, frames=frames,
                             video=video, scale=scale, rotate=rotate, landmark_noise=landmark_noise,
                             low_quality=low_quality, quality=quality, aug=aug, spread=spread)
    face_lines, mark_lines, template_identity = [], [], []
    media_ids = {}
    people = range(first_identity, first_identity + identities)
    with tqdm(total=identities, unit="identity", desc="IJB set", disable=not progress) as bar:
        for chunk, results in ordered_map(work, people, workers, chunk_size=4):
            for identity, images in zip(chunk, results):
                template_base = len(template_identity)
                template_identity += [identity] * templates
                for template, medium, jpeg, landmarks, score in images:
                    name = "%d.jpg" % (len(face_lines) + 1)
                    with open(os.path.join(image_dir, name), "wb") as f:
                        f.write(jpeg)
                    media_id = media_ids.setdefault((identity, template, medium), len(media_ids) + 1)
                    face_lines.append("%s %d %d" % (name, template_base + template + 1, media_id))
                    mark_lines.append(" ".join([name] + ["%.3f" % v for v in landmarks.ravel()] + ["%.4f" % score]))
                bar.update(1)
    pairs = make_pairs(np.array(template_identity), impostors, seed)
    paths = meta_paths(out_dir, target)
    atomic_write_bytes(paths["faces"], ("\n".join(face_lines) + "\n").encode())
    atomic_write_bytes(paths["landmarks"], ("\n".join(mark_lines) + "\n").encode())
    atomic_write_bytes(paths["pairs"], "".join("%d %d %d\n" % (a + 1, b + 1, label) for a, b, label in pairs).encode())
    summary = {"images": len(face_lines), "templates": len(template_identity), "media": len(media_ids),
               "genuine_pairs": int(pairs[:, 2].sum()), "impostor_pairs": int(len(pairs) - pairs[:, 2].sum())}
    log.info("wrote %s (%s): %s", out_dir, target, summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--first-identity", type=int, required=True,
                   help="first identity number (past the training set's identities for unseen people)")
    p.add_argument("--identities", type=int, default=100, help="people (default %(default)s)")
    p.add_argument("--target", type=str.upper, choices=TARGETS, default="IJBC", help="file prefix (default IJBC)")
    p.add_argument("--templates", type=int, default=3, help="templates per identity (default %(default)s)")
    p.add_argument("--media", type=int, default=3, help="at most this many media per template (default %(default)s)")
    p.add_argument("--frames", type=int, default=3, help="at most this many frames per video (default %(default)s)")
    p.add_argument("--video", type=float, default=0.3, help="chance that a media is a video (default %(default)s)")
    p.add_argument("--impostors", type=int, default=0, help="impostor pairs; 0: all (default %(default)s)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.7, 1.5), help="face scale range in the frame")
    p.add_argument("--rotate", type=float, default=20.0, help="max in-frame rotation, degrees (default %(default)s)")
    p.add_argument("--landmark-noise", type=float, default=1.0,
                   help="landmark error sigma, pixels at face scale 1 (default %(default)s)")
    p.add_argument("--low-quality", type=float, default=0.15,
                   help="fraction of downsampled, low-score images (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="make_synthetic.py's seed: the same people (default 0)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-100 (default %(default)s)")
    p.add_argument("--workers", type=cli.int_at_least(1), default=os.cpu_count(), help="drawing processes")
    p.add_argument("--spread", type=float, default=1.0, help="make_synthetic.py's --spread: the same people")
    p.add_argument("--strength", type=float, default=1.0, help="make_synthetic.py's --strength (augmentation)")
    args = p.parse_args(argv)
    if not 1 <= args.quality <= 100:
        p.error("--quality must be 1-100, got %d" % args.quality)
    for name in ("identities", "templates", "media", "frames"):
        if getattr(args, name) < 1:
            p.error("--%s must be >= 1, got %d" % (name, getattr(args, name)))
    if not 0.0 <= args.video <= 1.0 or not 0.0 <= args.low_quality <= 1.0:
        p.error("--video and --low-quality are fractions in [0, 1]")
    if not 0 < args.spread <= 1 or args.strength < 0:
        p.error("need 0 < --spread <= 1 and --strength >= 0, got %g and %g" % (args.spread, args.strength))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        make_ijb(args.out_dir, args.first_identity, args.identities, args.target, args.templates, args.media,
                 args.frames, args.video, args.impostors, tuple(args.scale), args.rotate, args.landmark_noise,
                 args.low_quality, args.seed, args.quality, workers=args.workers, spread=args.spread,
                 aug={name: value * args.strength for name, value in DEFAULT_AUG.items()})
    except (OSError, ValueError) as error:
        print("error: %s" % error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
