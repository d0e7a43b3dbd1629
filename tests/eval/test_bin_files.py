"""eval/verification.py's .bin container: round trip, Python-2 pickles, numpy flags, bad files and lists."""
import os
import pickle
import struct

import cv2
import numpy as np
import pytest

from eval import verification as ver


def random_faces(count, size=(6, 5), seed=1):
    """``count`` random uint8 RGB faces (count, 3, H, W)."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, 3) + size, dtype=np.uint8)


def encode(image_chw, ext=".png"):
    """uint8 RGB CHW -> encoded bytes (cv2 wants BGR HWC)."""
    ok, data = cv2.imencode(ext, np.ascontiguousarray(image_chw.transpose(1, 2, 0)[:, :, ::-1]))
    assert ok
    return data.tobytes()


def python2_pickle(bins, issame):
    """The bytes Python 2's cPickle (protocol 2) writes for (list of str, list of bool): BINSTRING opcodes,
    which Python 3 can only read with encoding='bytes'."""
    out = [b"\x80\x02(]("]
    for data in bins:
        out.append(b"T" + struct.pack("<I", len(data)) + data)
    out.append(b"e](" + b"".join(b"\x88" if v else b"\x89" for v in issame) + b"et.")
    return b"".join(out)


def test_write_then_load_round_trip_is_exact_and_rgb(tmp_path):
    faces = random_faces(6, size=(8, 7))
    faces[0] = 0
    faces[0, 0] = 255                        # pure red in RGB: the channel order must survive
    path = str(tmp_path / "set.bin")
    ver.write_bin(path, [encode(f) for f in faces], [True, False, True])
    images, issame = ver.load_bin(path, image_size=(8, 7))
    assert images.dtype == np.uint8 and images.shape == (6, 3, 8, 7)
    np.testing.assert_array_equal(images, faces)                        # PNG: lossless
    assert issame.dtype == np.bool_ and issame.tolist() == [True, False, True]
    assert [n for n in os.listdir(tmp_path) if n != "set.bin"] == []    # no temporary left behind


def test_python2_pickle_loads(tmp_path):
    faces = random_faces(4, size=(8, 8))
    bins = [encode(f, ".jpg") for f in faces]
    path = tmp_path / "py2.bin"
    path.write_bytes(python2_pickle(bins, [False, True]))
    with pytest.raises(UnicodeDecodeError):                  # what a plain pickle.load would do
        pickle.loads(path.read_bytes())
    images, issame = ver.load_bin(str(path), image_size=(8, 8))
    assert issame.tolist() == [False, True]
    for face, image in zip(bins, images):
        expected = cv2.imdecode(np.frombuffer(face, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].transpose(2, 0, 1)
        np.testing.assert_array_equal(image, expected)


def write_raw(path, content):
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)
    return str(path)


def test_bad_bin_files_name_the_file_and_index(tmp_path):
    good = [encode(f) for f in random_faces(4, size=(8, 8))]
    odd = write_raw(tmp_path / "odd.bin", (good[:3], [True]))
    with pytest.raises(ValueError, match=r"odd\.bin holds an odd number of images \(3\)"):
        ver.load_bin(odd, (8, 8))
    short = write_raw(tmp_path / "short.bin", (good, [True]))
    with pytest.raises(ValueError, match=r"short\.bin: 4 images make 2 pairs but issame has 1 entries"):
        ver.load_bin(short, (8, 8))
    broken = write_raw(tmp_path / "broken.bin", (good[:3] + [good[3][:40]], [True, False]))
    with pytest.raises(ValueError, match=r"broken\.bin image 3 \(pair 1\) cannot be decoded"):
        ver.load_bin(broken, (8, 8))
    junk = write_raw(tmp_path / "junk.bin", (good[:1] + [b"not an image"], [True]))
    with pytest.raises(ValueError, match=r"junk\.bin image 1 \(pair 0\) cannot be decoded"):
        ver.load_bin(junk, (8, 8))
    with pytest.raises(ValueError, match=r"sized\.bin image 0 \(pair 0\) is 8x8 \(HxW\), expected 112x112"):
        ver.load_bin(write_raw(tmp_path / "sized.bin", (good, [True, True])))
    flags = write_raw(tmp_path / "flags.bin", (good, [True, "yes"]))
    with pytest.raises(ValueError, match=r"flags\.bin: issame\[1\] is 'yes'"):
        ver.load_bin(flags, (8, 8))
    (tmp_path / "text.bin").write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"text\.bin is not a \.bin verification set"):
        ver.load_bin(str(tmp_path / "text.bin"))
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        ver.load_bin(str(tmp_path / "nowhere.bin"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = write_raw(tmp_path / "evil.bin", ([Payload()], [True]))
    with pytest.raises(ValueError, match=r"evil\.bin is not a \.bin.*system"):
        ver.load_bin(path)


def test_numpy_flags_and_array_images_load(tmp_path):
    good = [np.frombuffer(encode(f), np.uint8) for f in random_faces(2, size=(8, 8))]
    path = write_raw(tmp_path / "np.bin", (good, np.array([1], np.int64)))
    images, issame = ver.load_bin(path, (8, 8))
    assert images.shape == (2, 3, 8, 8) and issame.tolist() == [True]


def test_write_bin_rejects_bad_lists(tmp_path):
    with pytest.raises(ValueError, match="odd number of images"):
        ver.write_bin(str(tmp_path / "x.bin"), [b"a"] * 3, [True])
    with pytest.raises(ValueError, match="4 images make 2 pairs but issame has 3"):
        ver.write_bin(str(tmp_path / "x.bin"), [b"a"] * 4, [True] * 3)
    with pytest.raises(ValueError, match="image 1 is empty"):
        ver.write_bin(str(tmp_path / "x.bin"), [b"a", b""], [True])
    assert not os.path.exists(tmp_path / "x.bin")
