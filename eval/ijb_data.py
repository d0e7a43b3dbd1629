"""IJB-B / IJB-C data for eval/ijb.py: the three meta files (read fast, every error naming the file and line)
and the faces, aligned onto the ArcFace landmark template.

ROOT holds meta/{ijbb,ijbc}_face_tid_mid.txt (image template media), meta/..._template_pair_label.txt
(template1 template2 label), meta/..._name_5pts_score.txt (image x1 y1 ... x5 y5 detector_score), and the
images in loose_crop/. A face is aligned by the least-squares similarity transform (rotation, uniform scale,
shift) that maps its 5 landmarks onto ARCFACE_LANDMARKS, warped to 112 x 112 (bilinear, black border), RGB.
"""
import collections
import os
import warnings

import cv2
import numpy as np

FACE_SIZE = (112, 112)
ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]])      # eyes, nose tip, mouth corners (x, y)
TARGETS = ("IJBB", "IJBC")

IJBMeta = collections.namedtuple("IJBMeta", "names templates medias landmarks detector_scores pairs labels")


# ----------------------------------------------------------------------------------------------- meta
def meta_paths(data_dir, target):
    """{'faces', 'pairs', 'landmarks'}: the three meta files of ``target`` (IJBB / IJBC) under ``data_dir``."""
    prefix = os.path.join(data_dir, "meta", target.lower())
    return {"faces": prefix + "_face_tid_mid.txt", "pairs": prefix + "_template_pair_label.txt",
            "landmarks": prefix + "_name_5pts_score.txt"}


def check_meta_files(data_dir, target):
    """``meta_paths(data_dir, target)``; FileNotFoundError naming the first of them that is missing."""
    paths = meta_paths(data_dir, target)
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError("IJB meta file not found: %s" % path)
    return paths


def image_dir(data_dir):
    """``data_dir``/loose_crop, where the images are; FileNotFoundError when it is missing."""
    folder = os.path.join(data_dir, "loose_crop")
    if not os.path.isdir(folder):
        raise FileNotFoundError("IJB image folder not found: %s" % folder)
    return folder


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
    paths = check_meta_files(data_dir, target)
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
