"""Make a learnable face-like training set with no download: synthetic identities, packed as RecordIO.

    python tools/make_synthetic.py OUT_DIR --identities 1000 --images 20 --holdout 100 [--pairs 1000]

Each identity is a face-like 112x112 drawing with its own parameters: background, skin, hair colour and style,
face shape, eye spacing / size / colour, brows, nose, mouth, ears, glasses or beard, and a low-frequency
texture. Differences between identities are coarse (colour, layout), so a small network learns them in minutes.
Each image is a view of its identity: a small expression change (mouth, eyes, gaze), then shift, scale,
rotation, brightness / contrast, blur and noise, then JPEG. --strength scales every augmentation at once.

Writes OUT_DIR/train.rec/.idx (InsightFace layout), train_iter.rec/.idx (images-only, what the trainer reads),
property, and holdout.bin: a verification set in InsightFace's .bin layout (a pickle of (JPEG bytes list, issame
list), 2 images per pair) made from --holdout identities that are not in the training set, with --pairs pairs,
half of them same-identity. The output is a function of the arguments (--seed), not of --workers.
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

log = logging.getLogger("make_synthetic")
SIZE = 112
DEFAULT_AUG = {"shift": 0.06, "scale": 0.1, "rotate": 12.0, "brightness": 0.2, "contrast": 0.2,
               "noise": 5.0, "blur": 0.8, "expression": 1.2}
AUG_HELP = {"shift": "max shift, fraction of the image side", "scale": "max relative zoom in / out",
            "rotate": "max rotation, degrees", "brightness": "max brightness change, fraction of 255",
            "contrast": "max relative contrast change", "noise": "Gaussian noise sigma, grey levels",
            "blur": "max Gaussian blur sigma, pixels", "expression": "scale of the mouth / eye / gaze changes"}
_PARAMS, _VIEW, _PAIRS, _NOISE = 0, 1, 2, 3      # seed streams


def identity_params(seed, identity):
    """The drawing parameters of one identity (a dict), a pure function of (seed, identity)."""
    rng = np.random.default_rng([seed, _PARAMS, identity])
    u = rng.uniform

    def colour(low, high):
        return tuple(float(v) for v in rng.uniform(low, high, 3))

    skin_tone = u(0.25, 1.0)
    return {
        "background": colour(0, 255),
        "skin": tuple(float(v) for v in (np.array([235, 200, 170]) * skin_tone + rng.uniform(-35, 35, 3))),
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


def identity_views(identity, count, seed, aug, quality=90, first_view=0):
    """JPEG bytes of views ``first_view .. first_view + count - 1`` of ``identity``: a pure function of the
    arguments (each view has its own seeded generator)."""
    params = identity_params(seed, identity)
    field = texture_field(params)
    noise_pool = np.random.default_rng([seed, _NOISE, identity]).standard_normal((2 * SIZE, 2 * SIZE, 3),
                                                                                  dtype=np.float32)
    views = []
    for view in range(first_view, first_view + count):
        rng = np.random.default_rng([seed, _VIEW, identity, view])
        image = augment(render_face(params, rng, aug["expression"], field), rng, aug, noise_pool)
        views.append(rec_format.encode_image(image, "jpg", quality))
    return views


def _views_of(identities, count, seed, aug, quality):
    return [identity_views(i, count, seed, aug, quality) for i in identities]


def make_pairs(num_identities, images_per_identity, num_pairs, seed):
    """[(identity a, view a, identity b, view b, same)] with num_pairs / 2 same-identity pairs (two different
    views) and as many pairs of two different identities, in a seeded random order."""
    if num_pairs % 2 or num_pairs < 2:
        raise ValueError("--pairs must be a positive even number, got %d" % num_pairs)
    if num_identities < 2 or images_per_identity < 2:
        raise ValueError("holdout pairs need >= 2 identities with >= 2 images each, got %d x %d"
                         % (num_identities, images_per_identity))
    rng = np.random.default_rng([seed, _PAIRS])
    pairs = []
    for _ in range(num_pairs // 2):
        a = int(rng.integers(num_identities))
        va, vb = (int(v) for v in rng.choice(images_per_identity, 2, replace=False))
        pairs.append((a, va, a, vb, True))
        a, b = (int(v) for v in rng.choice(num_identities, 2, replace=False))
        pairs.append((a, int(rng.integers(images_per_identity)), b, int(rng.integers(images_per_identity)), False))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def make_dataset(out_dir, identities, images, holdout, pairs=1000, holdout_images=None, seed=0, aug=None,
                 quality=90, workers=None, progress=True):
    """Write the training set and holdout.bin into ``out_dir``; returns a summary dict."""
    from tqdm import tqdm
    aug = dict(DEFAULT_AUG, **(aug or {}))
    holdout_images = holdout_images or images
    workers = os.cpu_count() if workers is None else workers
    pair_list = make_pairs(holdout, holdout_images, pairs, seed) if holdout else []   # bad sizes fail here
    work = functools.partial(_views_of, count=images, seed=seed, aug=aug, quality=quality)
    prefix = os.path.join(out_dir, "train")
    with rec_format.RecordSetWriter(prefix, identities, (SIZE, SIZE)) as writer, \
            tqdm(total=identities * images, unit="img", desc="train", disable=not progress) as bar:
        for chunk, results in ordered_map(work, range(identities), workers, chunk_size=8):
            for identity, views in zip(chunk, results):
                for payload in views:
                    writer.add(identity, payload)
                bar.update(len(views))
    summary = {"train_images": writer.num_images, "identities": identities}
    if holdout:
        # held-out identities continue the identity numbering, so none of them is a training identity
        work = functools.partial(_views_of, count=holdout_images, seed=seed, aug=aug, quality=quality)
        held = []
        for _, results in tqdm(ordered_map(work, range(identities, identities + holdout), workers, chunk_size=4),
                               total=-(-holdout // 4), unit="chunk", desc="holdout", disable=not progress):
            held.extend(results)
        bins, issame = [], []
        for a, va, b, vb, same in pair_list:
            bins += [held[a][va], held[b][vb]]
            issame.append(same)
        with rec_format.staged(os.path.join(out_dir, "holdout.bin")) as tmp, open(tmp, "wb") as f:
            pickle.dump((bins, issame), f, protocol=4)
        summary.update(holdout_identities=holdout, pairs=len(issame))
    log.info("wrote %s: %s", out_dir, summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--identities", type=int, default=1000, help="training identities (classes)")
    p.add_argument("--images", type=int, default=20, help="images per training identity")
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
    if args.identities < 1 or args.images < 1 or args.holdout < 0:
        p.error("need --identities >= 1, --images >= 1 and --holdout >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    aug = {name: getattr(args, name) * args.strength for name in DEFAULT_AUG}
    make_dataset(args.out_dir, args.identities, args.images, args.holdout, args.pairs, args.holdout_images,
                 args.seed, aug, args.quality, args.workers)


if __name__ == "__main__":
    main()
