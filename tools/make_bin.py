"""Build an InsightFace .bin verification set from a list of image pairs (the inverse of loading one).

    python tools/make_bin.py pairs.txt data/my_set.bin [--image-size 112,112] [--quality 95]

See --help for the pairs file format. Every image is checked (decodable, of --image-size) before anything is
written; the .bin is written atomically, and eval/verification.py --target my_set reads it.
"""
import argparse
import os
import sys

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.verification import write_bin  # noqa: E402
from utils import cli  # noqa: E402

PAIRS_HELP = """PAIRS_FILE holds one pair a line: `path_a path_b 1|0` (1: same identity, 0: different), fields
separated by whitespace (so paths cannot contain spaces). Relative paths are relative to the folder of
PAIRS_FILE; absolute paths are used as they are. Blank lines and lines starting with # are skipped. Images
must be aligned faces of --image-size; JPEG files are stored byte for byte, other formats (PNG, BMP, ...)
are re-encoded as JPEG at --quality."""

JPEG_MAGIC = b"\xff\xd8\xff"


def read_pairs(pairs_file):
    """[(line number, path_a, path_b, same)] from ``pairs_file``, paths resolved against its folder."""
    if not os.path.isfile(pairs_file):
        raise FileNotFoundError("pairs file not found: %s" % pairs_file)
    folder = os.path.dirname(os.path.abspath(pairs_file))
    pairs = []
    with open(pairs_file) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 3:
                raise ValueError("%s line %d: expected 'path_a path_b 1|0', found %d fields: %r"
                                 % (pairs_file, number, len(fields), line.strip()))
            if fields[2] not in ("0", "1"):
                raise ValueError("%s line %d: the same/different flag must be 1 or 0, found %r"
                                 % (pairs_file, number, fields[2]))
            path_a, path_b = (os.path.join(folder, p) for p in fields[:2])   # join keeps absolute paths
            pairs.append((number, path_a, path_b, fields[2] == "1"))
    if not pairs:
        raise ValueError("%s holds no pairs" % pairs_file)
    return pairs


def face_jpeg(path, image_size, quality, where):
    """The JPEG bytes to store for the image at ``path``: its own bytes if it is a JPEG, else re-encoded.
    Raises ValueError (starting with ``where``) for a missing, undecodable or wrongly sized image."""
    if not os.path.isfile(path):
        raise ValueError("%s: no such image file: %s" % (where, path))
    with open(path, "rb") as f:
        data = f.read()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ValueError("%s: %s cannot be decoded as an image" % (where, path))
    if image.shape[:2] != tuple(image_size):
        raise ValueError("%s: %s is %dx%d (HxW), expected %dx%d aligned faces"
                         % ((where, path) + image.shape[:2] + tuple(image_size)))
    if data.startswith(JPEG_MAGIC):
        return data
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("%s: %s could not be re-encoded as JPEG" % (where, path))
    return encoded.tobytes()


def make_bin(pairs_file, out_path, image_size=(112, 112), quality=95, progress=True):
    """Write the .bin of the pairs listed in ``pairs_file`` to ``out_path``; returns the number of pairs."""
    pairs = read_pairs(pairs_file)
    cache = {}          # an image used by several pairs is read, checked and stored once
    jpegs, issame = [], []
    for number, path_a, path_b, same in tqdm(pairs, desc="images", unit="pair", disable=not progress):
        for path in (path_a, path_b):
            if path not in cache:
                cache[path] = face_jpeg(path, image_size, quality, "%s line %d" % (pairs_file, number))
            jpegs.append(cache[path])
        issame.append(same)
    write_bin(out_path, jpegs, issame)
    return len(pairs)


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after a one-line error naming the file, line or value)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=PAIRS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs_file", metavar="PAIRS_FILE", help="list of image pairs (format below)")
    parser.add_argument("out", metavar="OUT.bin", help="the .bin to write")
    parser.add_argument("--image-size", type=cli.image_size, default=(112, 112),
                        help="H,W (or one size) every image must have (default 112,112)")
    parser.add_argument("--quality", type=cli.int_at_least(1), default=95,
                        help="JPEG quality for re-encoded images, 1-100 (default 95)")
    args = parser.parse_args(argv)
    if args.quality > 100:
        parser.error("argument --quality: must be <= 100, got %d" % args.quality)

    def body():
        cli.check_output_file(args.out, "OUT.bin")              # before every image is read and checked
        count = make_bin(args.pairs_file, args.out, args.image_size, args.quality)
        print("wrote %s: %d pairs" % (args.out, count))
    return cli.run(body, "make_bin")


if __name__ == "__main__":
    sys.exit(main())
