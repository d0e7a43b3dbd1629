"""Make a learnable face-like training set with no download: synthetic identities, packed as RecordIO.

    python tools/make_synthetic.py OUT_DIR --identities 1000 --images 20 --holdout 100 [--pairs 1000]
    python tools/make_synthetic.py OUT_DIR --identities 3000 --images 60 --long-tail 0.6 --min-images 3 \\
        --conflicts 0.1 --label-noise 0.03 --spread 0.6 --strength 1.3          # noisy, long-tailed, harder

Each identity is a face-like 112x112 drawing with its own parameters: background, skin, hair colour and style,
face shape, eye spacing / size / colour, brows, nose, mouth, ears, glasses or beard, and a low-frequency
texture. Differences between identities are coarse (colour, layout), so a small network learns them in minutes.
Each image is a view of its identity: a small expression change (mouth, eyes, gaze), then shift, scale,
rotation, brightness / contrast, blur and noise, then JPEG. --strength scales every augmentation at once.

Difficulty: --spread s < 1 draws every continuous identity parameter (colours, sizes, positions, texture) from
the middle s of its range, so identities look more alike; with --strength it sets how hard the set is.

Labels (the training set only): --long-tail a gives identity k max(--min-images, round(--images * (k+1)^-a))
images instead of --images each (a power law: a few identities with many images, most with few). --conflicts f
splits round(f * identities) identities (seeded, among those with >= 2 images) over two labels: the last half of
their images get a second label, numbered after the identities (one person under two labels). --label-noise f
gives round(f * training images) images (seeded) a label drawn uniformly from the labels of other identities;
every label keeps at least one image of its own identity. OUT_DIR/labels.npz records the truth of every record
of the training set, in record order: identity, view, label, noisy (bool); and the second label of each
identity (-1: none).

Writes OUT_DIR/train.rec/.idx (InsightFace layout), train_iter.rec/.idx (images-only, what the trainer reads),
property, labels.npz and holdout.bin: a verification set in InsightFace's .bin layout (a pickle of (JPEG bytes
list, issame list), 2 images per pair) made from --holdout identities that are not in the training set (always
clean), with --pairs pairs, half of them same-identity. Held-out identities are numbered after the training
identities (tools/make_synthetic_ijb.py --first-identity should start past both). The output is a function of
the arguments (--seed), not of --workers.
"""
import argparse
import functools
import logging
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recognition.data import rec_format  # noqa: E402
from tools.pack_rec import ordered_map  # noqa: E402
from tools.synthetic_labels import image_counts, label_plan, make_pairs  # noqa: E402

log = logging.getLogger("make_synthetic")
SIZE = 112
DEFAULT_AUG = {"shift": 0.06, "scale": 0.1, "rotate": 12.0, "brightness": 0.2, "contrast": 0.2,
               "noise": 5.0, "blur": 0.8, "expression": 1.2}
AUG_HELP = {"shift": "max shift, fraction of the image side", "scale": "max relative zoom in / out",
            "rotate": "max rotation, degrees", "brightness": "max brightness change, fraction of 255",
            "contrast": "max relative contrast change", "noise": "Gaussian noise sigma, grey levels",
            "blur": "max Gaussian blur sigma, pixels", "expression": "scale of the mouth / eye / gaze changes"}
_PARAMS, _VIEW, _NOISE = 0, 1, 3      # seed streams (tools/synthetic_labels.py: 2, 4, 5; make_synthetic_ijb: 10+)


def identity_params(seed, identity, spread=1.0):
    """The drawing parameters of one identity (a dict), a pure function of (seed, identity, spread). ``spread``
    in (0, 1]: each continuous parameter is drawn from the middle ``spread`` of its range (same draws, pulled
    towards the middle), so identities look more alike; 1 is the full range."""
    rng = np.random.default_rng([seed, _PARAMS, identity])
    if spread == 1.0:
        u = rng.uniform
    else:
        def u(low, high, size=None):
            middle = (low + high) / 2.0
            return middle + spread * (rng.uniform(low, high, size) - middle)

    def colour(low, high):
        return tuple(float(v) for v in u(low, high, 3))

    skin_tone = u(0.25, 1.0)
    return {
        "background": colour(0, 255),
        "skin": tuple(float(v) for v in (np.array([235, 200, 170]) * skin_tone + u(-35, 35, 3))),
        "face_w": u(30, 42), "face_h": u(37, 48), "face_y": u(57, 62), "jaw": u(0.0, 1.0),
        "hair": colour(0, 200), "hair_style": int(rng.integers(0, 4)), "hairline": u(0.15, 0.5),
        "eye_y": u(46, 56), "eye_dx": u(12, 21), "eye_w": u(4, 8), "eye_h": u(2.5, 4.5),
        "iris": colour(0, 180), "brow_gap": u(5, 10), "brow_tilt": u(-0.35, 0.35), "brow_thick": u(1.5, 4.0),
        "nose_len": u(9, 20), "nose_w": u(3, 9), "mouth_y": u(78, 90), "mouth_w": u(8, 17),
        "mouth_curve": u(-4, 6), "mouth_thick": u(2, 5), "lips": colour(60, 230),
        "ear": u(4, 9), "extra": int(rng.choice(4, p=[0.55, 0.2, 0.15, 0.1])),   # none, glasses, beard, both
        "extra_colour": colour(0, 120),
        "texture": [(u(0, np.pi), u(2.0, 6.0), u(0, 2 * np.pi), u(6, 22)) for _ in range(2)],
    }


def render_face(p, rng, expression=1.0, field=None):
    """RGB uint8 (SIZE, SIZE, 3) drawing of identity ``p`` with a small random expression change; ``field`` is
    texture_field(p) (computed when not given)."""
    import cv2
    e = expression
    field = texture_field(p) if field is None else field
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = np.array(p["background"], np.uint8)
    cx, cy = SIZE / 2 + rng.normal(0, 0.8 * e), p["face_y"]
    gaze = rng.normal(0, 1.0 * e)

    def ellipse(centre, axes, colour, angle=0.0, thickness=-1, arc=(0, 360)):
        cv2.ellipse(img, (int(round(centre[0] * 16)), int(round(centre[1] * 16))),
                    (max(1, int(round(axes[0] * 16))), max(1, int(round(axes[1] * 16)))), angle, arc[0], arc[1],
                    colour, thickness, cv2.LINE_AA, 4)

    hair = p["hair"]
    if p["hair_style"] in (2, 3):                           # long hair behind the head
        ellipse((cx, cy + 6), (p["face_w"] + 9, p["face_h"] + 12), hair)
    for side in (-1, 1):                                    # ears
        ellipse((cx + side * p["face_w"] * 0.98, p["eye_y"] + 6), (p["ear"] * 0.7, p["ear"]), p["skin"])
    ellipse((cx, cy), (p["face_w"], p["face_h"]), p["skin"])
    jaw = p["jaw"] * 0.35 * p["face_w"]                     # squarer jaw: a box over the lower face
    cv2.rectangle(img, (int(cx - p["face_w"] + jaw * 0.3), int(cy)),
                  (int(cx + p["face_w"] - jaw * 0.3), int(cy + p["face_h"] * 0.55 * p["jaw"])), p["skin"], -1)
    _texture(img, p, cx, cy, field)
    if p["hair_style"] in (1, 3):                           # hair on top
        top = cy - p["face_h"]
        ellipse((cx, top + p["face_h"] * p["hairline"]), (p["face_w"] * 1.02, p["face_h"] * p["hairline"] * 1.6),
                hair, arc=(180, 360))
        cv2.rectangle(img, (int(cx - p["face_w"]), int(top + p["face_h"] * p["hairline"] - 1)),
                      (int(cx + p["face_w"]), int(top + p["face_h"] * p["hairline"] + 2)), hair, -1)
    if p["extra"] in (2, 3):                                # beard
        ellipse((cx, p["mouth_y"] + 6), (p["face_w"] * 0.6, 12), p["extra_colour"], arc=(0, 180))
    openness = float(np.clip(1 + rng.normal(0, 0.15 * e), 0.5, 1.4))
    for side in (-1, 1):
        ex = cx + side * p["eye_dx"]
        ellipse((ex, p["eye_y"]), (p["eye_w"], p["eye_h"] * openness), (245, 245, 245))
        ellipse((ex + gaze, p["eye_y"]), (p["eye_h"] * 0.9, p["eye_h"] * 0.9 * openness), p["iris"])
        by = p["eye_y"] - p["eye_h"] - p["brow_gap"]
        tilt = side * p["brow_tilt"] * p["eye_w"]
        cv2.line(img, (int((ex - p["eye_w"] * 1.2) * 16), int((by + tilt) * 16)),
                 (int((ex + p["eye_w"] * 1.2) * 16), int((by - tilt) * 16)), hair,
                 max(1, int(round(p["brow_thick"]))), cv2.LINE_AA, 4)
        if p["extra"] in (1, 3):                            # glasses
            ellipse((ex, p["eye_y"]), (p["eye_w"] + 4, p["eye_h"] + 5), p["extra_colour"], thickness=2)
    nose_top, nose_tip = p["eye_y"] + 3, p["eye_y"] + 3 + p["nose_len"]
    shade = tuple(0.75 * c for c in p["skin"])
    pts = np.array([[cx, nose_top], [cx - p["nose_w"], nose_tip], [cx + p["nose_w"], nose_tip]]) * 16
    cv2.fillPoly(img, [pts.astype(np.int32)], shade, cv2.LINE_AA, 4)
    curve = p["mouth_curve"] + rng.normal(0, 1.5 * e)
    xs = np.linspace(-p["mouth_w"], p["mouth_w"], 9)
    ys = p["mouth_y"] + curve * (1 - (xs / p["mouth_w"]) ** 2) - curve / 2
    mouth = (np.stack([cx + xs, ys], 1) * 16).astype(np.int32)
    cv2.polylines(img, [mouth], False, p["lips"], max(1, int(round(p["mouth_thick"]))), cv2.LINE_AA, 4)
    return img


def texture_field(p):
    """The identity's low-frequency pattern (two gratings about the face centre) as (positive, negative) uint8
    (SIZE, SIZE, 3) parts, to add / subtract with saturation."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    xx, yy = xx - SIZE / 2, yy - p["face_y"]
    wave = np.zeros((SIZE, SIZE), np.float32)
    for angle, cycles, phase, amplitude in p["texture"]:
        along = (np.cos(angle) * xx + np.sin(angle) * yy) / (2 * p["face_w"])
        wave += amplitude * np.sin(2 * np.pi * cycles * along + phase)
    wave = np.repeat(np.rint(wave)[:, :, None], 3, axis=2)
    return np.clip(wave, 0, 255).astype(np.uint8), np.clip(-wave, 0, 255).astype(np.uint8)


def _texture(img, p, cx, cy, field):
    """Add the identity's texture inside the face ellipse (centred at cx, cy)."""
    import cv2
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (int(round(cx * 16)), int(round(cy * 16))),
                (int(round(p["face_w"] * 16)), int(round(p["face_h"] * 16))), 0, 0, 360, 255, -1, cv2.LINE_8, 4)
    cv2.add(img, field[0], dst=img, mask=mask)
    cv2.subtract(img, field[1], dst=img, mask=mask)


def augment(img, rng, aug, noise_pool=None):
    """A view of ``img``: shift, scale, rotation (about the centre), brightness / contrast, blur, noise. The noise
    is a random window of ``noise_pool`` (standard normal, at least 2 x SIZE on each side) when given: drawing
    fresh Gaussian noise would be half the cost of a view."""
    import cv2
    angle = rng.uniform(-1, 1) * aug["rotate"]
    scale = 1 + rng.uniform(-1, 1) * aug["scale"]
    matrix = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-1, 1, 2) * aug["shift"] * SIZE
    out = cv2.warpAffine(img, matrix, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    sigma = rng.uniform(0, aug["blur"])
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    gain = 1 + rng.uniform(-1, 1) * aug["contrast"]
    offset = rng.uniform(-1, 1) * aug["brightness"] * 255
    out = out.astype(np.float32) * np.float32(gain) + np.float32(offset + 128 * (1 - gain))
    if aug["noise"] > 0:
        if noise_pool is None:
            noise = rng.standard_normal(out.shape, dtype=np.float32)
        else:
            y, x = rng.integers(0, noise_pool.shape[0] - SIZE + 1), rng.integers(0, noise_pool.shape[1] - SIZE + 1)
            noise = noise_pool[y:y + SIZE, x:x + SIZE]
        out += noise * np.float32(aug["noise"])
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def render_views(identity, views, seed, aug, quality=90, spread=1.0):
    """JPEG bytes of views ``views`` (view numbers) of ``identity``: each view a pure function of (seed,
    identity, view, aug, quality, spread), with its own seeded generator."""
    params = identity_params(seed, identity, spread)
    field = texture_field(params)
    noise_pool = np.random.default_rng([seed, _NOISE, identity]).standard_normal((2 * SIZE, 2 * SIZE, 3),
                                                                                  dtype=np.float32)
    jpegs = []
    for view in views:
        rng = np.random.default_rng([seed, _VIEW, identity, view])
        image = augment(render_face(params, rng, aug["expression"], field), rng, aug, noise_pool)
        jpegs.append(rec_format.encode_image(image, "jpg", quality))
    return jpegs


def identity_views(identity, count, seed, aug, quality=90, first_view=0, spread=1.0):
    """JPEG bytes of views ``first_view .. first_view + count - 1`` of ``identity`` (see ``render_views``)."""
    return render_views(identity, range(first_view, first_view + count), seed, aug, quality, spread)


def _render_groups(groups, seed, aug, quality, spread):
    """For each group (a list of (identity, view)): the JPEG bytes of its images in order; each identity of a
    group is drawn once."""
    out = []
    for group in groups:
        jpegs = [None] * len(group)
        members = {}
        for position, (identity, view) in enumerate(group):
            members.setdefault(identity, []).append((position, view))
        for identity, items in members.items():
            for (position, _), jpeg in zip(items, render_views(identity, [v for _, v in items], seed, aug, quality,
                                                               spread)):
                jpegs[position] = jpeg
        out.append(jpegs)
    return out


def plan_dataset(identities, images, holdout, pairs=1000, holdout_images=None, seed=0, aug=None, quality=90,
                 long_tail=0.0, min_images=1, conflicts=0.0, label_noise=0.0, spread=1.0):
    """Check the arguments of ``make_dataset`` and plan it: (LabelPlan, holdout pair list). Every bad value is a
    ValueError naming it, raised before anything is drawn or written."""
    checks = [(identities >= 1, "--identities must be >= 1, got %s" % identities),
              (images >= 1, "--images must be >= 1, got %s" % images),
              (holdout >= 0, "--holdout must be >= 0, got %s" % holdout),
              (seed >= 0, "--seed must be >= 0, got %s" % seed),
              (1 <= quality <= 100, "--quality must be in 1..100, got %s" % quality),
              (long_tail >= 0, "--long-tail must be >= 0, got %s" % long_tail),
              (1 <= min_images <= images, "--min-images must be in 1..--images (%s), got %s" % (images, min_images)),
              (0 <= conflicts <= 1, "--conflicts must be a fraction in [0, 1], got %s" % conflicts),
              (0 <= label_noise < 1, "--label-noise must be a fraction in [0, 1), got %s" % label_noise),
              (0 < spread <= 1, "--spread must be in (0, 1], got %s" % spread)]
    checks += [(value >= 0, "--%s must be >= 0, got %s" % (name, value)) for name, value in (aug or {}).items()]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    pair_list = make_pairs(holdout, holdout_images or images, pairs, seed) if holdout else []
    plan = label_plan(image_counts(identities, images, long_tail, min_images), seed, conflicts, label_noise)
    return plan, pair_list


def make_dataset(out_dir, identities, images, holdout, pairs=1000, holdout_images=None, seed=0, aug=None,
                 quality=90, workers=None, progress=True, long_tail=0.0, min_images=1, conflicts=0.0,
                 label_noise=0.0, spread=1.0):
    """Write the training set, labels.npz and holdout.bin into ``out_dir``; returns a summary dict."""
    from tqdm import tqdm
    aug = dict(DEFAULT_AUG, **(aug or {}))
    plan, pair_list = plan_dataset(identities, images, holdout, pairs, holdout_images, seed, aug, quality, long_tail,
                                   min_images, conflicts, label_noise, spread)
    workers = os.cpu_count() if workers is None else workers
    os.makedirs(out_dir, exist_ok=True)
    work = functools.partial(_render_groups, seed=seed, aug=aug, quality=quality, spread=spread)
    starts = np.flatnonzero(np.diff(plan.label, prepend=-1))          # each label's first record
    groups = [list(zip(identity.tolist(), view.tolist())) for identity, view in
              zip(np.split(plan.identity, starts[1:]), np.split(plan.view, starts[1:]))]
    prefix = os.path.join(out_dir, "train")
    with rec_format.RecordSetWriter(prefix, plan.num_labels, (SIZE, SIZE)) as writer, \
            tqdm(total=len(plan.label), unit="img", desc="train", disable=not progress) as bar:
        for chunk, results in ordered_map(work, groups, workers, chunk_size=8):
            for jpegs in results:
                for jpeg in jpegs:
                    writer.add(plan.label[writer.num_images], jpeg)      # records in plan order
                bar.update(len(jpegs))
    with rec_format.staged(os.path.join(out_dir, "labels.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, identity=plan.identity, view=plan.view, label=plan.label, noisy=plan.noisy,
                 second_label=plan.second_label)
    summary = {"train_images": writer.num_images, "identities": identities}
    if plan.num_labels != identities or plan.noisy.any() or long_tail:
        summary.update(labels=plan.num_labels, conflicted=int((plan.second_label >= 0).sum()),
                       noisy_images=int(plan.noisy.sum()), images_min_max=[int(v) for v in
                                                                           np.bincount(plan.identity)[[0, -1]]][::-1])
    if holdout:
        # held-out identities continue the identity numbering, so none of them is a training identity; only the
        # views the pairs use are drawn
        needed = {}
        for a, va, b, vb, _ in pair_list:
            needed.setdefault(a, set()).add(va)
            needed.setdefault(b, set()).add(vb)
        people = sorted(needed)
        groups = [[(identities + a, v) for v in sorted(needed[a])] for a in people]
        held = {}
        for chunk, results in tqdm(ordered_map(work, groups, workers, chunk_size=4), total=-(-len(groups) // 4),
                                   unit="chunk", desc="holdout", disable=not progress):
            for group, jpegs in zip(chunk, results):
                held.update({(identity - identities, view): jpeg for (identity, view), jpeg in zip(group, jpegs)})
        bins, issame = [], []
        for a, va, b, vb, same in pair_list:
            bins += [held[a, va], held[b, vb]]
            issame.append(same)
        with rec_format.staged(os.path.join(out_dir, "holdout.bin")) as tmp, open(tmp, "wb") as f:
            pickle.dump((bins, issame), f, protocol=4)
        summary.update(holdout_identities=holdout, pairs=len(issame))
    log.info("wrote %s: %s", out_dir, summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--identities", type=int, default=1000, help="training identities (people)")
    p.add_argument("--images", type=int, default=20,
                   help="images per training identity (with --long-tail: of the largest identity)")
    p.add_argument("--long-tail", type=float, default=0.0,
                   help="power-law exponent a of the images per identity (0: --images each)")
    p.add_argument("--min-images", type=int, default=1, help="with --long-tail: the fewest images of an identity")
    p.add_argument("--conflicts", type=float, default=0.0,
                   help="fraction of identities whose images are split over two labels")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="fraction of training images under another identity's label")
    p.add_argument("--spread", type=float, default=1.0,
                   help="share of each identity parameter's range drawn from, in (0, 1]: lower is harder")
    p.add_argument("--holdout", type=int, default=100, help="identities of holdout.bin, none of them in training")
    p.add_argument("--holdout-images", type=int, default=None, help="images per held-out identity (default --images)")
    p.add_argument("--pairs", type=int, default=1000, help="pairs in holdout.bin, half same-identity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="drawing processes")
    p.add_argument("--strength", type=float, default=1.0, help="multiplies every augmentation below")
    for name, value in DEFAULT_AUG.items():
        p.add_argument("--" + name, type=float, default=value, help=AUG_HELP[name] + " (default %(default)s)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.strength < 0:
        p.error("need --workers >= 1 and --strength >= 0, got %d and %g" % (args.workers, args.strength))
    aug = {name: getattr(args, name) * args.strength for name in DEFAULT_AUG}
    knobs = dict(long_tail=args.long_tail, min_images=args.min_images, conflicts=args.conflicts,
                 label_noise=args.label_noise, spread=args.spread)
    try:
        plan_dataset(args.identities, args.images, args.holdout, args.pairs, args.holdout_images, args.seed, aug,
                     args.quality, **knobs)
    except ValueError as error:
        p.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        make_dataset(args.out_dir, args.identities, args.images, args.holdout, args.pairs, args.holdout_images,
                     args.seed, aug, args.quality, args.workers, **knobs)
    except OSError as error:
        p.exit(1, "%s: error: %s\n" % (p.prog, error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
