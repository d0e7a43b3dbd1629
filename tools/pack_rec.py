"""Pack a folder of face images (one sub-folder per identity) into RecordIO training files.

    python tools/pack_rec.py IMAGE_DIR OUT_PREFIX [--layout both|insightface|iter] [--encoding jpg|png]

Identity folders, sorted by name, get class ids 0 .. C-1; a folder's images are taken sorted by name. A folder
without a usable image (no image file, or none that decodes) is skipped with a warning and the others keep
consecutive ids, as InsightFace's own folder listing numbers them. By default BOTH layouts are written, plus
``property`` ("C,H,W") beside them:
    OUT_PREFIX.rec/.idx            InsightFace's layout (header, images, identity records): for InsightFace tools
    OUT_PREFIX_iter.rec/.idx       the images-only layout mx.io.ImageRecordIter (recognition/data/record_reader.py) reads
    OUT_PREFIX_iter.ids.npz        its identity -> record keys index, for FFC's id loader (data/identity_index.py)
Images are decoded in parallel processes; one that does not decode is skipped, counted and named in the log.
An image of another size is resized to --image-size. A JPEG of the right size is stored as it is (no second
compression); other images are encoded as --encoding (png: lossless). The outputs are written under temporary
names and replace older files only when packing succeeds; a folder without one usable image is an error.
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
from utils import cli  # noqa: E402

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
    """(identity folder names, [(path, class id)]) of an image folder: the folders that hold image files, numbered
    in name order (folders without any are left out, with a warning); errors name the folder."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError("image folder not found: %s" % image_dir)
    folders = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    if not folders:
        raise ValueError("%s has no identity sub-folders (expected IMAGE_DIR/<identity>/<image>)" % image_dir)
    identities, files, empty = [], [], []
    for name in folders:
        folder = os.path.join(image_dir, name)
        images = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                  if f.lower().endswith(rec_format.IMAGE_EXTENSIONS)]
        if not images:
            empty.append(name)
            continue
        files += [(path, len(identities)) for path in images]
        identities.append(name)
    if not files:
        raise ValueError("%s: no image files (%s) in its %d identity folders"
                         % (image_dir, " ".join(rec_format.IMAGE_EXTENSIONS), len(folders)))
    if empty:
        log.warning("skipped %d identity folder(s) of %s without image files (the others are numbered without "
                    "gaps): %s%s", len(empty), image_dir, ", ".join(empty[:10]), ", ..." if len(empty) > 10 else "")
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
        except OSError as err:
            out.append((class_id, None, "%s: %s" % (path, err)))
            continue
        try:
            bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
        except cv2.error:           # some damaged files make OpenCV raise instead of returning None
            bgr = None
        if bgr is None:
            out.append((class_id, None, "%s: %s" % (path, "does not decode as an image" if raw else "empty file")))
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
    """Pack ``image_dir`` into ``out_prefix`` files; returns {"num_images", "num_classes", "skipped", "resized",
    "dropped_identities"}. An identity none of whose files decodes is dropped and the later ones renumbered."""
    from tqdm import tqdm
    identities, files = list_images(image_dir)
    workers = os.cpu_count() if workers is None else workers
    work = functools.partial(load_images, image_size=tuple(image_size), encoding=encoding, quality=quality)
    skipped, resized = [], 0
    new_ids = {}                            # listed class id -> written class id (identities with an image)
    class_ids = array.array("q")            # of every image written, for the identity index (8 bytes each)
    with rec_format.RecordSetWriter(out_prefix, None, image_size, layouts) as writer, \
            tqdm(total=len(files), unit="img", desc="pack", disable=not progress) as bar:
        for _, results in ordered_map(work, files, workers):
            for class_id, payload, note in results:
                if payload is None:
                    skipped.append(note)
                    log.warning("skipped %s", note)
                    continue
                resized += note == "resized"
                class_id = new_ids.setdefault(class_id, len(new_ids))   # files come in class order
                writer.add(class_id, payload)
                class_ids.append(class_id)
            bar.update(len(results))
        if not writer.num_images:           # raised inside the writer: no older output is replaced
            raise ValueError("%s: none of its %d image files decodes (first: %s); nothing written"
                             % (image_dir, len(files), skipped[0]))
    dropped = [name for c, name in enumerate(identities) if c not in new_ids]
    if dropped:
        log.warning("dropped %d identity folder(s) none of whose images decodes (the others are numbered without "
                    "gaps): %s%s", len(dropped), ", ".join(dropped[:10]), ", ..." if len(dropped) > 10 else "")
    if "iter" in layouts:
        identity_index.write_for_new_file(rec_format.iter_prefix(out_prefix) + ".rec", class_ids)
    summary = {"num_images": writer.num_images, "num_classes": len(new_ids), "skipped": len(skipped),
               "resized": resized, "dropped_identities": len(dropped)}
    log.info("packed %d images of %d identities into %s (%s); skipped %d unreadable file(s), resized %d",
             writer.num_images, len(new_ids), out_prefix, " + ".join(layouts), len(skipped), resized)
    return summary


def main(argv=None):
    """Run the CLI; returns the exit status (0, or 1 after a one-line error naming the file or value)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_dir", help="folder with one sub-folder of images per identity")
    p.add_argument("out_prefix", help="output prefix, e.g. data/faces/train")
    p.add_argument("--layout", choices=("both", "insightface", "iter"), default="both",
                   help="which files to write (default: both, see above)")
    p.add_argument("--encoding", choices=("jpg", "png"), default="jpg", help="png stores images losslessly")
    p.add_argument("--quality", type=cli.int_at_least(1), default=95, help="JPEG quality of re-encoded images (1-100)")
    p.add_argument("--image-size", type=cli.image_size, default=(112, 112),
                   help="height,width of the stored images (default 112,112)")
    p.add_argument("--workers", type=cli.int_at_least(1), default=os.cpu_count(), help="decoding processes")
    args = p.parse_args(argv)
    if args.quality > 100:
        p.error("argument --quality: must be <= 100, got %d" % args.quality)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    layouts = ("insightface", "iter") if args.layout == "both" else (args.layout,)

    def body():
        pack(args.image_dir, args.out_prefix, layouts, args.image_size, args.encoding, args.quality, args.workers)
    return cli.run(body, "pack_rec")


if __name__ == "__main__":
    sys.exit(main())
