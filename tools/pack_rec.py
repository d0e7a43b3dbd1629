"""Pack a folder of face images (one sub-folder per identity) into RecordIO training files.

    python tools/pack_rec.py IMAGE_DIR OUT_PREFIX [--layout both|insightface|iter] [--encoding jpg|png]

Identity folders, sorted by name, get class ids 0 .. C-1; a folder's images are taken sorted by name. By default
BOTH layouts are written, plus ``property`` ("C,H,W") beside them:
    OUT_PREFIX.rec/.idx            InsightFace's layout (header, images, identity records): for InsightFace tools
    OUT_PREFIX_iter.rec/.idx       the images-only layout mx.io.ImageRecordIter (recognition/data/record_reader.py) reads
    OUT_PREFIX_iter.ids.npz        its identity -> record keys index, for FFC's id loader (data/identity_index.py)
Images are decoded in parallel processes; one that does not decode is skipped, counted and named in the log.
An image of another size is resized to --image-size. A JPEG of the right size is stored as it is (no second
compression); other images are encoded as --encoding (png: lossless).
"""
import argparse
import array
import collections
import functools
import logging
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recognition.data import identity_index, rec_format  # noqa: E402

log = logging.getLogger("pack_rec")


def ordered_map(func, items, workers, chunk_size=64):
    """Yield (chunk, ``func(chunk)``) for consecutive chunks (lists) of ``items``, in order, ``func`` running in
    ``workers`` processes (inline when workers <= 1). At most 2 x workers chunks are in flight, so memory stays
    bounded however long ``items`` is."""
    chunks = _chunked(items, chunk_size)
    if workers <= 1:
        for chunk in chunks:
            yield chunk, func(chunk)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(func, (chunk,))))
            if len(pending) >= 2 * workers:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()


def _chunked(items, size):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def list_images(image_dir):
    """(identity folder names, [(path, class id)]) of an image folder; errors name the folder."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError("image folder not found: %s" % image_dir)
    identities = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    if not identities:
        raise ValueError("%s has no identity sub-folders (expected IMAGE_DIR/<identity>/<image>)" % image_dir)
    files = []
    for class_id, name in enumerate(identities):
        folder = os.path.join(image_dir, name)
        for fname in sorted(os.listdir(folder)):
            if fname.lower().endswith(rec_format.IMAGE_EXTENSIONS):
                files.append((os.path.join(folder, fname), class_id))
    if not files:
        raise ValueError("%s: no image files (%s) in its %d identity folders"
                         % (image_dir, " ".join(rec_format.IMAGE_EXTENSIONS), len(identities)))
    return identities, files


def load_images(tasks, image_size, encoding, quality):
    """[(class id, payload bytes or None, note)] for [(path, class id)]: note is the reason a file was
    skipped, 'resized', or ''."""
    import cv2
    import numpy as np
    out = []
    for path, class_id in tasks:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        except OSError as err:
            out.append((class_id, None, "%s: %s" % (path, err)))
            continue
        if bgr is None:
            out.append((class_id, None, "%s: does not decode as an image" % path))
            continue
        note = ""
        if bgr.shape[:2] != tuple(image_size):
            bgr = cv2.resize(bgr, (image_size[1], image_size[0]), interpolation=cv2.INTER_AREA)
            note = "resized"
        elif encoding == "jpg" and raw[:2] == b"\xff\xd8":
            out.append((class_id, raw, note))          # a JPEG of the right size: keep its bytes
            continue
        out.append((class_id, rec_format.encode_image(bgr[:, :, ::-1], encoding, quality), note))
    return out


def pack(image_dir, out_prefix, layouts=("insightface", "iter"), image_size=(112, 112), encoding="jpg",
         quality=95, workers=None, progress=True):
    """Pack ``image_dir`` into ``out_prefix`` files; returns {"num_images", "num_classes", "skipped",
    "resized"}."""
    from tqdm import tqdm
    identities, files = list_images(image_dir)
    workers = os.cpu_count() if workers is None else workers
    work = functools.partial(load_images, image_size=tuple(image_size), encoding=encoding, quality=quality)
    skipped, resized = [], 0
    class_ids = array.array("q")            # of every image written, for the identity index (8 bytes each)
    with rec_format.RecordSetWriter(out_prefix, len(identities), image_size, layouts) as writer, \
            tqdm(total=len(files), unit="img", desc="pack", disable=not progress) as bar:
        for _, results in ordered_map(work, files, workers):
            for class_id, payload, note in results:
                if payload is None:
                    skipped.append(note)
                    log.warning("skipped %s", note)
                    continue
                resized += note == "resized"
                writer.add(class_id, payload)
                class_ids.append(class_id)
            bar.update(len(results))
    if "iter" in layouts:
        identity_index.write_for_new_file(rec_format.iter_prefix(out_prefix) + ".rec", class_ids)
    summary = {"num_images": writer.num_images, "num_classes": len(identities), "skipped": len(skipped),
               "resized": resized}
    log.info("packed %d images of %d identities into %s (%s); skipped %d unreadable file(s), resized %d",
             writer.num_images, len(identities), out_prefix, " + ".join(layouts), len(skipped), resized)
    return summary


def parse_size(text):
    """'112,112' or '112' -> (112, 112); None if malformed."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        return None
    return (values[0], values[-1]) if len(values) in (1, 2) and min(values) > 0 else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_dir", help="folder with one sub-folder of images per identity")
    p.add_argument("out_prefix", help="output prefix, e.g. data/faces/train")
    p.add_argument("--layout", choices=("both", "insightface", "iter"), default="both",
                   help="which files to write (default: both, see above)")
    p.add_argument("--encoding", choices=("jpg", "png"), default="jpg", help="png stores images losslessly")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--image-size", default="112,112", help="height,width of the stored images")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    args = p.parse_args(argv)
    size = parse_size(args.image_size)
    if size is None:
        p.error("--image-size must be HEIGHT,WIDTH, got %r" % args.image_size)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    layouts = ("insightface", "iter") if args.layout == "both" else (args.layout,)
    pack(args.image_dir, args.out_prefix, layouts, size, args.encoding, args.quality, args.workers)


if __name__ == "__main__":
    main()
