"""tools/make_bin.py: a pairs file becomes a .bin that eval/verification.py loads back (JPEGs byte for byte,
other formats re-encoded); every bad line or image is reported with its line number and nothing is written."""
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from eval.verification import load_bin
from tests.harness import ROOT
from tools import make_bin


def write_face(path, seed, size=(112, 112)):
    """A random BGR face image at ``path`` (format from the extension); returns its RGB CHW pixels as decoded."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = cv2.resize(coarse, size[::-1], interpolation=cv2.INTER_LINEAR)     # smooth: JPEG keeps it close
    assert cv2.imwrite(str(path), image)
    decoded = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return decoded[:, :, ::-1].transpose(2, 0, 1)


def test_pairs_file_round_trips_through_load_bin(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    pixels = {name: write_face(faces / name, seed) for seed, name in enumerate(["a.jpg", "b.jpg", "c.png"])}
    absolute_c = str(faces / "c.png")
    (tmp_path / "pairs.txt").write_text("# LFW-style list\n"
                                        "faces/a.jpg faces/b.jpg 0\n"
                                        "\n"
                                        "faces/a.jpg %s 1\n"
                                        "faces/b.jpg\tfaces/b.jpg 1\n" % absolute_c)
    out = str(tmp_path / "out" / "mine.bin")
    assert make_bin.make_bin(str(tmp_path / "pairs.txt"), out, progress=False) == 3
    images, issame = load_bin(out)
    assert issame.tolist() == [False, True, True]
    order = ["a.jpg", "b.jpg", "a.jpg", "c.png", "b.jpg", "b.jpg"]
    for name, image in zip(order, images):
        if name.endswith(".jpg"):
            np.testing.assert_array_equal(image, pixels[name])                 # the JPEG bytes themselves
        else:
            error = np.abs(image.astype(int) - pixels[name]).mean()
            assert 0 < error < 2, error                                       # re-encoded as JPEG, close
            assert np.abs(image.astype(int) - pixels[name][::-1]).mean() > 10 * error     # and still RGB
    with open(out, "rb") as f:
        bins, _ = pickle.load(f)
    assert bins[0] == (faces / "a.jpg").read_bytes()
    assert bins[3].startswith(b"\xff\xd8\xff") and bins[3] != (faces / "c.png").read_bytes()
    assert os.listdir(tmp_path / "out") == ["mine.bin"]


@pytest.mark.parametrize("line, message", [
    ("a.jpg missing.jpg 1", r"pairs\.txt line 2: no such image file: .*missing\.jpg"),
    ("a.jpg broken.jpg 1", r"pairs\.txt line 2: .*broken\.jpg cannot be decoded"),
    ("a.jpg small.jpg 0", r"pairs\.txt line 2: .*small\.jpg is 64x64 \(HxW\), expected 112x112"),
    ("a.jpg a.jpg yes", r"pairs\.txt line 2: the same/different flag must be 1 or 0, found 'yes'"),
    ("a.jpg 1", r"pairs\.txt line 2: expected 'path_a path_b 1\|0', found 2 fields"),
])
def test_bad_lines_name_the_line_and_write_nothing(tmp_path, capsys, line, message):
    write_face(tmp_path / "a.jpg", 0)
    write_face(tmp_path / "small.jpg", 1, size=(64, 64))
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:30])
    (tmp_path / "pairs.txt").write_text("a.jpg a.jpg 1\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        make_bin.make_bin(str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin"), progress=False)
    assert make_bin.main([str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin")]) == 1
    assert "line 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.bin")


def test_image_size_option_and_empty_or_missing_pairs_file(tmp_path, capsys):
    write_face(tmp_path / "s.png", 3, size=(64, 48))
    (tmp_path / "pairs.txt").write_text("s.png s.png 1\n")
    assert make_bin.main([str(tmp_path / "pairs.txt"), str(tmp_path / "s.bin"), "--image-size", "64,48"]) == 0
    images, issame = load_bin(str(tmp_path / "s.bin"), image_size=(64, 48))
    assert images.shape == (2, 3, 64, 48) and issame.tolist() == [True]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert make_bin.main([str(tmp_path / "empty.txt"), str(tmp_path / "e.bin")]) == 1
    assert "holds no pairs" in capsys.readouterr().err
    assert make_bin.main([str(tmp_path / "nowhere.txt"), str(tmp_path / "e.bin")]) == 1
    assert "pairs file not found" in capsys.readouterr().err


def test_script_runs_from_the_repository_root(tmp_path):
    write_face(tmp_path / "a.jpg", 0)
    (tmp_path / "pairs.txt").write_text("a.jpg %s 1\n" % (tmp_path / "a.jpg"))
    done = subprocess.run([sys.executable, "tools/make_bin.py", str(tmp_path / "pairs.txt"), str(tmp_path / "a.bin")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote %s: 1 pairs" % (tmp_path / "a.bin") in done.stdout
    assert load_bin(str(tmp_path / "a.bin"))[1].tolist() == [True]
    helped = subprocess.run([sys.executable, "tools/make_bin.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert "relative to the folder of" in helped.stdout and "path_a path_b 1|0" in helped.stdout


def test_output_and_options_are_checked_before_the_images(tmp_path, capsys):
    (tmp_path / "pairs.txt").write_text("missing.jpg missing.jpg 1\n")      # would fail only once images are read
    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path / "file" / "x.bin", "OUT.bin %s: %s is a file" % (tmp_path / "file" / "x.bin",
                                                                                     tmp_path / "file")),
                         (tmp_path, "OUT.bin %s is a folder" % tmp_path)):
        assert make_bin.main([str(tmp_path / "pairs.txt"), str(out)]) == 1
        err = capsys.readouterr().err
        assert "make_bin: error: " + message in err and "Traceback" not in err, err
    for argv in (["--quality", "0"], ["--quality", "101"], ["--image-size", "64,x"]):
        with pytest.raises(SystemExit):
            make_bin.main([str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin")] + argv)
        assert "error: argument " + argv[0] in capsys.readouterr().err
