"""Convert an InsightFace RecordIO training set into the images-only files mx.io.ImageRecordIter reads.

    python tools/convert_rec.py SRC_PREFIX [DST_PREFIX] [--shuffle] [--seed S] [--workers W]

Reads SRC_PREFIX.rec/.idx (InsightFace's layout: header, images, identity records; or any RecordIO file of
images whose first label is the class id) and writes DST_PREFIX_iter.rec/.idx (DST_PREFIX defaults to
SRC_PREFIX), one record per image, ``property`` beside them with the class count, and DST_PREFIX_iter.ids.npz,
the identity -> record keys index of FFC's id loader (recognition/data/identity_index.py). It streams: memory is
the source index and the class ids written (24 bytes a record) plus a few chunks of records in flight.

Every record is checked: its RecordIO framing (parsed in Python, so a damaged file cannot crash the run), an
integer class id, and that its image decodes (in parallel processes) at the size of ``property`` (or
--image-size). Damaged records are skipped, counted and named in the log; records without a payload (the header
and identity records) are left out. A class id >= the class count of an existing ``property`` is an error that
names the record. --shuffle writes the images in a random order (seeded), for fast sequential reading.
The outputs are written under temporary names and replace older files only when the conversion succeeds; a
source without one usable image is an error (exit status 1) and leaves the folder as it was.
"""
import argparse
import array
import functools
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recognition.data import identity_index, rec_format  # noqa: E402
from tools.pack_rec import ordered_map  # noqa: E402
from utils import cli  # noqa: E402

log = logging.getLogger("convert_rec")
_LOGGED_SKIPS = 20


def read_source(rec_path, keys, offsets, stats):
    """Yield (key, class id, payload) of the image records at ``offsets``, in the given order; damaged records
    are counted in ``stats`` (and named in the log), payload-less ones (header / identities) left out."""
    with rec_format.RecordFile(rec_path) as f:
        for key, offset in zip(keys, offsets):
            try:
                flag, labels, payload = rec_format.unpack_record(f.read(offset))
                if not payload:
                    stats["non_image"] += 1
                    continue
                class_id = rec_format.exact_class_id(flag, labels, "record %d" % key)
            except ValueError as err:
                skip(stats, key, str(err))
                continue
            yield int(key), class_id, payload


def skip(stats, key, reason):
    stats["damaged"] += 1
    stats.setdefault("first_skip", "record %d: %s" % (key, reason))
    if stats["damaged"] <= _LOGGED_SKIPS:
        log.warning("skipped record %d: %s", key, reason)


def check_images(chunk, image_size):
    """Reasons ('' if fine) the payloads of [(key, class, payload)] fail to decode at ``image_size``."""
    reasons = []
    for _, _, payload in chunk:
        try:
            rec_format.decode_image(payload, image_size)
            reasons.append("")
        except ValueError as err:
            reasons.append(str(err))
    return reasons


def convert(src_prefix, dst_prefix=None, shuffle=False, seed=0, workers=None, image_size=None, progress=True):
    """Write ``dst_prefix``_iter.rec/.idx and property from ``src_prefix``.rec/.idx; returns {"num_images",
    "num_classes", "damaged", "non_image"}."""
    from tqdm import tqdm
    dst_prefix = dst_prefix or src_prefix
    rec_path, idx_path = src_prefix + ".rec", src_prefix + ".idx"
    if not os.path.isfile(rec_path):
        raise FileNotFoundError("source record file not found: %s" % rec_path)
    keys, offsets = rec_format.read_index(idx_path)
    src_property = rec_format.property_path(src_prefix)
    num_classes = None
    if os.path.isfile(src_property):
        num_classes, height, width = rec_format.read_property(src_property)
        image_size = image_size or (height, width)
    image_size = tuple(image_size or (112, 112))
    header = _insightface_header(rec_path, keys, offsets)
    if num_classes is None and header is not None:
        num_classes = header[1]
    order = np.argsort(keys, kind="stable")
    if shuffle:
        order = np.random.default_rng(seed).permutation(order)
    stats = {"damaged": 0, "non_image": 0}
    workers = os.cpu_count() if workers is None else workers
    records = read_source(rec_path, keys[order], offsets[order], stats)
    work = functools.partial(check_images, image_size=image_size)
    writer = rec_format.RecordSetWriter(dst_prefix, None, image_size, layouts=("iter",))
    class_ids = array.array("q")            # of every image written, for the identity index (8 bytes each)
    with writer, tqdm(total=len(keys), unit="rec", desc="convert", disable=not progress) as bar:
        seen = 0
        for chunk, reasons in ordered_map(work, records, workers):
            for (key, class_id, payload), reason in zip(chunk, reasons):
                if reason:
                    skip(stats, key, reason)
                    continue
                if num_classes is not None and class_id >= num_classes:
                    raise ValueError("%s record %d has class id %d >= num_classes %d (from %s)" % (
                        rec_path, key, class_id, num_classes,
                        src_property if os.path.isfile(src_property) else "the header record"))
                writer.add(class_id, payload)
                class_ids.append(class_id)
            total = writer.num_images + stats["damaged"] + stats["non_image"]
            bar.update(total - seen)
            seen = total
        if not writer.num_images:           # raised inside the writer: nothing replaces an older output
            raise ValueError("%s holds no usable image record (%d record(s) in its index: %d damaged%s, %d without "
                             "an image); nothing written" % (
                                 rec_path, len(keys), stats["damaged"],
                                 ", first " + stats["first_skip"] if stats["damaged"] else "", stats["non_image"]))
        writer.num_classes = max(num_classes or 0, writer.max_class + 1)
    identity_index.write_for_new_file(rec_format.iter_prefix(dst_prefix) + ".rec", class_ids)
    if header is not None and header[0] != writer.num_images + stats["damaged"]:
        log.warning("the header record announces %d images, the file holds %d (%d written, %d damaged)",
                    header[0], writer.num_images + stats["damaged"], writer.num_images, stats["damaged"])
    if stats["damaged"] > _LOGGED_SKIPS:
        log.warning("... %d damaged records skipped in all", stats["damaged"])
    log.info("wrote %d images of %d classes to %s_iter.rec/.idx (%s); skipped %d damaged record(s) and %d "
             "header/identity record(s)", writer.num_images, writer.num_classes, dst_prefix,
             "shuffled" if shuffle else "in key order", stats["damaged"], stats["non_image"])
    stats.pop("first_skip", None)
    return {"num_images": writer.num_images, "num_classes": writer.num_classes, **stats}


def _insightface_header(rec_path, keys, offsets):
    """(num_images, num_classes) from InsightFace's header record (key 0: flag > 0, no payload, label (N + 1,
    N + 1 + C)), or None when the file has none or its counts are past float32's exact range."""
    at = np.flatnonzero(keys == 0)
    if not at.size:
        return None
    with rec_format.RecordFile(rec_path) as f:
        try:
            flag, labels, payload = rec_format.unpack_record(f.read(offsets[at[0]]))
        except ValueError:
            return None
    if flag < 2 or payload or labels[1] >= rec_format.LABEL_SPLIT:
        return None
    return int(labels[0]) - 1, int(labels[1] - labels[0])


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after a one-line error naming the file or value)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_prefix", help="InsightFace files SRC_PREFIX.rec / SRC_PREFIX.idx")
    p.add_argument("dst_prefix", nargs="?", help="output prefix (default SRC_PREFIX): writes DST_PREFIX_iter.*")
    p.add_argument("--shuffle", action="store_true", help="write the images in a random order")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    p.add_argument("--workers", type=cli.int_at_least(1), default=os.cpu_count(), help="image-checking processes")
    p.add_argument("--image-size", type=cli.image_size, default=None,
                   help="height,width every image must have (default: from property, else 112,112)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def body():
        convert(args.src_prefix, args.dst_prefix, args.shuffle, args.seed, args.workers, args.image_size)
    return cli.run(body, "convert_rec")


if __name__ == "__main__":
    sys.exit(main())
