"""eval/ijb_data.py: the alignment (least-squares similarity, warp) against NumPy re-computations, and the meta
files: read, joined by name, and every kind of damage named by file and line."""
import os

import numpy as np
import pytest

from eval import ijb_data

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                     [70.7299, 92.2041]])          # the ArcFace points, typed again on purpose


# ------------------------------------------------------------------------------------------ references
def similarity(scale, degrees, shift):
    """A hand-made 2 x 3 similarity matrix."""
    c, s = scale * np.cos(np.radians(degrees)), scale * np.sin(np.radians(degrees))
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def lstsq_similarity(points):
    """The least-squares similarity onto TEMPLATE as a 10 x 4 linear system in (a, b, tx, ty)."""
    rows, target = [], []
    for (x, y), (u, v) in zip(points, TEMPLATE):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        target += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(target), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def bilinear_warp(image, matrix, size=(112, 112)):
    """Inverse-map every output pixel through ``matrix`` and interpolate bilinearly; 0 outside the image."""
    height, width = image.shape[:2]
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    padded = np.zeros((height + 3, width + 3, image.shape[2]))      # a ring of zeros around the image
    padded[1:height + 1, 1:width + 1] = image
    y, x = np.mgrid[0:size[0], 0:size[1]]
    sx, sy, _ = np.tensordot(inverse, np.stack([x, y, np.ones_like(x)]), axes=1)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    outside = (x0 < -1) | (x0 >= width) | (y0 < -1) | (y0 >= height)
    x0, y0 = np.clip(x0, -1, width) + 1, np.clip(y0, -1, height) + 1
    out = ((1 - fy) * ((1 - fx) * padded[y0, x0] + fx * padded[y0, x0 + 1])
           + fy * ((1 - fx) * padded[y0 + 1, x0] + fx * padded[y0 + 1, x0 + 1]))
    out[outside] = 0
    return out


# ------------------------------------------------------------------------------------------ alignment
def test_alignment_recovers_a_hand_made_similarity():
    cases = [(1.0, 0.0, (0, 0)), (0.6, 17.0, (-20.5, 13.0)), (2.3, -140.0, (90.0, -35.0))]
    truths = np.array([similarity(*case) for case in cases])
    # landmarks that the true transform maps exactly onto the template
    landmarks = np.array([(TEMPLATE - m[:, 2]) @ np.linalg.inv(m[:, :2]).T for m in truths])
    np.testing.assert_allclose(ijb_data.similarity_matrices(landmarks), truths, atol=1e-9)
    np.testing.assert_allclose(ijb_data.ARCFACE_LANDMARKS, TEMPLATE)


def test_alignment_is_the_least_squares_similarity():
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(0, 250, (6, 5, 2))                  # far from any similarity image of the template
    got = ijb_data.similarity_matrices(landmarks)
    for points, matrix in zip(landmarks, got):
        np.testing.assert_allclose(matrix, lstsq_similarity(points), atol=1e-9)


def test_warp_matches_a_numpy_bilinear_warp_and_gives_rgb():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:90, 0:120]
    bgr = np.stack([120 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0 - c) for c in range(3)], 2)
    bgr = np.clip(bgr + rng.normal(0, 2, bgr.shape), 0, 255).astype(np.uint8)
    matrix = similarity(1.4, 25.0, (-30.0, 10.0))                # part of the output falls outside: black
    got = ijb_data.align_face(bgr, matrix)
    assert got.shape == (3, 112, 112) and got.dtype == np.uint8
    expected = bilinear_warp(bgr.astype(np.float64), matrix)[:, :, ::-1].transpose(2, 0, 1)
    coverage = bilinear_warp(np.ones((90, 120, 1)), matrix)[:, :, 0]     # 1: all four source pixels inside
    assert (coverage == 0).mean() > 0.1 and (got[:, coverage == 0] == 0).all()
    # OpenCV interpolates at 1/32 pixel and rounds to uint8: within 1 grey level inside the image; on its edge,
    # where a pixel is mixed with the black border (a jump of ~150), the 1/32 pixel costs up to ~5
    error = np.abs(got - expected)
    assert error[:, coverage == 1].max() < 1 and error[:, coverage < 1].max() < 6 and error.mean() < 0.5
    red = np.zeros((40, 40, 3), np.uint8)
    red[:, :, 2] = 255                                           # red in BGR
    face = ijb_data.align_face(red, similarity(1.0, 0.0, (0, 0)))
    assert (face[0, :40, :40] == 255).all() and (face[1:, :40, :40] == 0).all() and (face[:, 50:, 50:] == 0).all()


# ------------------------------------------------------------------------------------------- meta files
def write_meta(root, faces, marks, pairs, target="ijbc"):
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    for suffix, lines in (("face_tid_mid", faces), ("name_5pts_score", marks), ("template_pair_label", pairs)):
        with open(os.path.join(root, "meta", "%s_%s.txt" % (target, suffix)), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(root)


def mark_line(name, offset=0.0, score=0.9):
    return " ".join([name] + ["%.2f" % (v + offset) for v in TEMPLATE.ravel()] + [str(score)])


GOOD_FACES = ["a.jpg 1 10", "b.jpg 1 11", "c.jpg 2 12"]
GOOD_MARKS = [mark_line("a.jpg"), mark_line("b.jpg", 1.0), mark_line("c.jpg", 2.0, 0.5)]
GOOD_PAIRS = ["1 2 0", "1 1 1"]


def test_meta_is_read_and_joined_by_name(tmp_path):
    root = write_meta(tmp_path, GOOD_FACES[:1] + ["", "  "] + GOOD_FACES[1:], GOOD_MARKS[::-1],
                      ["", "1 2 0", "", "1 1 1"])
    meta = ijb_data.read_meta(root, "IJBC")
    assert meta.names == ["a.jpg", "b.jpg", "c.jpg"]
    assert meta.templates.tolist() == [1, 1, 2] and meta.medias.tolist() == [10, 11, 12]
    np.testing.assert_allclose(meta.landmarks[1], TEMPLATE + 1.0, atol=0.006)     # b's landmarks, though listed 2nd
    assert meta.detector_scores.tolist() == [0.9, 0.9, 0.5]
    assert meta.pairs.tolist() == [[1, 2], [1, 1]] and meta.labels.tolist() == [0, 1]


@pytest.mark.parametrize("faces, marks, pairs, message", [
    (["a.jpg 1"] + GOOD_FACES[1:], GOOD_MARKS, GOOD_PAIRS, r"face_tid_mid\.txt line 1: expected 3 fields"),
    (GOOD_FACES[:2] + ["c.jpg x 12"], GOOD_MARKS, GOOD_PAIRS, r"face_tid_mid\.txt line 3: 'x' is not an integer"),
    (GOOD_FACES[:1] + ["", "b.jpg 1.5 11"] + GOOD_FACES[2:], GOOD_MARKS, GOOD_PAIRS,
     r"face_tid_mid\.txt line 3: '1\.5' is not an integer"),
    (GOOD_FACES, GOOD_MARKS[:2] + [mark_line("c.jpg", score=float("nan"))], GOOD_PAIRS,
     r"name_5pts_score\.txt line 3: the landmarks or score of c\.jpg are not finite"),
    (GOOD_FACES, GOOD_MARKS[:1] + ["b.jpg 1 2 3"] + GOOD_MARKS[2:], GOOD_PAIRS,
     r"name_5pts_score\.txt line 2: expected 12 fields"),
    (GOOD_FACES, GOOD_MARKS[:2] + [mark_line("c.jpg").replace("38.29", "nope")], GOOD_PAIRS,
     r"name_5pts_score\.txt line 3: 'nope' is not a number"),
    (GOOD_FACES, GOOD_MARKS[:2] + ["c.jpg" + " 5" * 10 + " 0.9"], GOOD_PAIRS,
     r"name_5pts_score\.txt line 3: .*5 points coincide"),
    (GOOD_FACES, GOOD_MARKS[:2] + [mark_line("b.jpg")], GOOD_PAIRS,
     r"name_5pts_score\.txt line 3: b\.jpg already has landmarks \(line 2\)"),
    (GOOD_FACES, GOOD_MARKS[:2] + [mark_line("d.jpg")], GOOD_PAIRS,
     r"face_tid_mid\.txt line 3: image c\.jpg has no landmarks"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "1 2"], r"template_pair_label\.txt line 2: expected 3 fields"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "1 2 one"], r"template_pair_label\.txt line 2: 'one' is not an integer"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "1 2 3"], r"template_pair_label\.txt line 2: the label must be 0 or 1"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "1 2 1.0"], r"template_pair_label\.txt line 2: '1\.0' is not an integer"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "1 2 1 0"], r"template_pair_label\.txt line 2: expected 3 fields"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "", "2 7 1"], r"template_pair_label\.txt line 3: template 7 has no images"),
    (GOOD_FACES, GOOD_MARKS, ["1 2 0", "2 1 0"], r"every pair is labelled 0"),
    (GOOD_FACES, GOOD_MARKS, [""], r"template_pair_label\.txt holds no lines"),
])
def test_bad_meta_names_the_file_and_line(tmp_path, faces, marks, pairs, message):
    root = write_meta(tmp_path, faces, marks, pairs)
    with pytest.raises(ValueError, match=message):
        ijb_data.read_meta(root, "IJBC")


def test_missing_meta_files_are_named(tmp_path):
    root = write_meta(tmp_path, GOOD_FACES, GOOD_MARKS, GOOD_PAIRS, target="ijbb")
    with pytest.raises(FileNotFoundError, match=r"meta/ijbc_face_tid_mid\.txt"):
        ijb_data.read_meta(root, "IJBC")
    os.remove(os.path.join(root, "meta", "ijbb_template_pair_label.txt"))
    with pytest.raises(FileNotFoundError, match=r"meta/ijbb_template_pair_label\.txt"):
        ijb_data.read_meta(root, "IJBB")
