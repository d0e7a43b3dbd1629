"""RecordIO layouts of a training set: InsightFace's, and the images-only one ``mx.io.ImageRecordIter`` reads.

InsightFace layout, ``P.rec`` + ``P.idx`` (records are read by key through the index):
    key 0            header: flag 2, label (N + 1, N + 1 + C), no payload
    keys 1 .. N      images: flag 0, label = class id (float32: exact only below 2^24), JPEG payload
    keys N+1 .. N+C  identities: flag 2, label (first image key, end key) of class c = key - N - 1, no payload
Images-only layout, ``P_iter.rec`` + ``P_iter.idx`` (this project's; ``ImageRecordIter`` decodes every record):
    key i = position i (0 .. N-1), one record per image, in file order, flag 4, label
        (class mod 2^24, class div 2^24, key mod 2^24, key div 2^24)
    read with ``label_width=4``. Every part is an integer below 2^24, so float32 holds it exactly: class ids and
    keys stay exact up to 2^48. The key lets the reader account for every record it hands out.
``property`` (in the data folder): one line ``num_classes,height,width``.

RecordIO itself: each part is ``magic (0xced7230a), lrec = cflag << 29 | length`` (little-endian uint32) then
``length`` bytes padded to 4. A payload that contains the magic word is split into parts (cflag 1 first,
2 middle, 3 last) and joined with the magic word in between. ``RecordFile`` parses this in Python and raises
ValueError on damage: MXNet's own readers abort the process on a broken header.
"""
import contextlib
import math
import os
import struct
import tempfile

import numpy as np

MAGIC = 0xCED7230A
LABEL_SPLIT = 1 << 24           # float32 holds every integer below this exactly
ITER_LABEL_WIDTH = 4            # (class lo, class hi, key lo, key hi)
ITER_SUFFIX = "_iter"
PROPERTY = "property"
IR_FORMAT = "IfQQ"              # IRHeader: flag, label, id, id2
IR_SIZE = struct.calcsize(IR_FORMAT)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------------ file names
def iter_prefix(prefix):
    """'data/train' -> 'data/train_iter': the images-only files that belong to an InsightFace prefix."""
    return prefix + ITER_SUFFIX


def property_path(prefix):
    """The ``property`` file beside the files of ``prefix``."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), PROPERTY)


def index_path(rec_path):
    """'x.rec' -> 'x.idx'."""
    return os.path.splitext(rec_path)[0] + ".idx"


# ------------------------------------------------------------------------------------------------ property
def read_property(path):
    """(num_classes, height, width) from a ``property`` file; FileNotFoundError / ValueError naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError("property file not found: %s (one line 'num_classes,height,width')" % path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:      # binary garbage: name the file rather than the codec
        raise ValueError("%s: expected one line 'num_classes,height,width', found %d bytes of binary data"
                         % (path, len(raw))) from None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise ValueError("%s: expected one line 'num_classes,height,width' of positive integers, got %r"
                         % (path, text[:80]))
    return tuple(values)


def write_property(path, num_classes, image_size):
    with staged(path) as tmp, open(tmp, "w") as f:
        f.write("%d,%d,%d\n" % (num_classes, image_size[0], image_size[1]))


def temp_path(path):
    """A new empty temporary file in ``path``'s folder, for writing ``path`` and then renaming it there."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)
    return tmp


@contextlib.contextmanager
def staged(path):
    """``with staged(final) as tmp:`` write ``tmp``; on success it replaces ``final`` (atomic rename), on an
    exception it is removed and ``final`` keeps its old content."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------------------ records
def pack_record(flag, label, payload=b"", record_id=0):
    """An IRHeader + payload, as ``mx.recordio.pack`` makes it: flag 0 takes one label, flag k > 0 k labels."""
    if flag == 0:
        return struct.pack(IR_FORMAT, 0, float(label), record_id, 0) + payload
    label = np.asarray(label, dtype=np.float32).ravel()
    if label.size != flag:
        raise ValueError("flag %d needs %d labels, got %d" % (flag, flag, label.size))
    return struct.pack(IR_FORMAT, flag, 0.0, record_id, 0) + label.tobytes() + payload


def unpack_record(record):
    """(flag, labels float32 array, payload) of one record's bytes; ValueError if too short for its header."""
    if len(record) < IR_SIZE:
        raise ValueError("record of %d bytes is shorter than its %d-byte header" % (len(record), IR_SIZE))
    flag, label, _, _ = struct.unpack_from(IR_FORMAT, record)
    if flag == 0:
        return 0, np.array([label], np.float32), record[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if len(record) < end:
        raise ValueError("record header says %d labels but the record has %d bytes" % (flag, len(record)))
    return flag, np.frombuffer(record, np.float32, flag, IR_SIZE).copy(), record[end:]


def header_record(num_images, num_classes):
    """InsightFace record 0: image keys 1..N, identity keys N+1..N+C."""
    return pack_record(2, (num_images + 1, num_images + 1 + num_classes))


def identity_record(start, end):
    """InsightFace identity record: the class's image keys are start .. end-1."""
    return pack_record(2, (start, end))


def iter_label(class_id, key):
    """The images-only label: (class lo, class hi, key lo, key hi), each exact in float32."""
    return (class_id % LABEL_SPLIT, class_id // LABEL_SPLIT, key % LABEL_SPLIT, key // LABEL_SPLIT)


def decode_iter_labels(labels):
    """(class ids int64, keys int64) from ImageRecordIter labels of shape (B, 4)."""
    parts = np.rint(np.asarray(labels, dtype=np.float64)).astype(np.int64)
    return parts[:, 0] + parts[:, 1] * LABEL_SPLIT, parts[:, 2] + parts[:, 3] * LABEL_SPLIT


def exact_class_id(flag, labels, where):
    """The class id of an image record in any layout: the images-only (lo, hi, ...) pair when flag is 4, else
    the first label. ValueError naming ``where`` if it is not a non-negative integer."""
    value = float(labels[0]) + (float(labels[1]) * LABEL_SPLIT if flag == ITER_LABEL_WIDTH else 0.0)
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise ValueError("%s: class label %r is not a non-negative integer" % (where, value))
    return int(value)


# ------------------------------------------------------------------------------------------------ images
class WrongImageSize(ValueError):
    """An image decodes but is not the size the data set says."""


def decode_image(payload, image_size):
    """RGB uint8 (H, W, 3) of an encoded image; ValueError with the reason if it does not decode, WrongImageSize
    (a ValueError) if its size is not ``image_size`` (height, width)."""
    import cv2
    if len(payload) == 0:
        raise ValueError("empty payload")
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("payload of %d bytes does not decode as an image" % len(payload))
    if image.shape[:2] != tuple(image_size):
        raise WrongImageSize("image is %dx%d, expected %dx%d" % (image.shape[0], image.shape[1], *image_size))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_image(rgb, encoding="jpg", quality=95):
    """JPEG (``quality``) or PNG (lossless) bytes of an RGB uint8 image."""
    import cv2
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encoding == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode("." + encoding, bgr, params)
    if not ok:
        raise ValueError("OpenCV could not encode a %s image as %s" % (rgb.shape, encoding))
    return buf.tobytes()


# ------------------------------------------------------------------------------------------------ reading
def read_index(idx_path):
    """(keys, offsets) int64 arrays of a ``.idx`` file, in file order. Errors name the file."""
    if not os.path.isfile(idx_path):
        raise FileNotFoundError("index file not found: %s" % idx_path)
    if os.path.getsize(idx_path) == 0:
        raise ValueError("index file %s is empty" % idx_path)
    try:
        table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError("index file %s is not 'key<TAB>offset' lines: %s" % (idx_path, err)) from None
    if table.shape[1] != 2:
        raise ValueError("index file %s has %d columns, expected 2 (key, offset)" % (idx_path, table.shape[1]))
    return table[:, 0].copy(), table[:, 1].copy()


class RecordFile:
    """Random access to the records of a RecordIO file in Python: damage raises ValueError, never a crash."""

    def __init__(self, rec_path):
        if not os.path.isfile(rec_path):
            raise FileNotFoundError("record file not found: %s" % rec_path)
        self.path = rec_path
        self.size = os.path.getsize(rec_path)
        self._fd = os.open(rec_path, os.O_RDONLY)

    def read(self, offset):
        """The record (IRHeader + payload bytes) that starts at byte ``offset``."""
        return self.read_with_end(offset)[0]

    def read_with_end(self, offset):
        """(record bytes, byte just past its last part) of the record that starts at byte ``offset``."""
        parts, pos, first = [], int(offset), True
        while True:
            head = os.pread(self._fd, 8, pos)
            if len(head) < 8:
                raise ValueError("truncated: the file ends inside the record header at byte %d" % pos)
            magic, lrec = struct.unpack("<II", head)
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            if magic != MAGIC:
                raise ValueError("no RecordIO magic at byte %d" % pos)
            if (cflag not in (0, 1)) if first else (cflag not in (2, 3)):
                raise ValueError("record part flag %d out of sequence at byte %d" % (cflag, pos))
            data = os.pread(self._fd, length, pos + 8)
            if len(data) < length:
                raise ValueError("truncated: the record at byte %d needs %d bytes, the file ends after %d"
                                 % (pos, length, len(data)))
            parts.append(data)
            pos += 8 + ((length + 3) & ~3)
            first = False
            if cflag in (0, 3):
                return struct.pack("<I", MAGIC).join(parts), pos

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RecordSetWriter:
    """Writes a training set in the InsightFace layout (``P.rec/.idx``), the images-only layout
    (``P_iter.rec/.idx``) or both at once, then ``property``. For the InsightFace layout images must come in
    class order (non-decreasing ids: each identity's images are one key range); the images-only layout takes any
    order. ``num_classes=None``: max class id + 1 (or set ``writer.num_classes`` before ``close()``). Files are
    written under temporary names and renamed on ``close()``; ``abort()`` (an exception inside ``with``) leaves
    the old files untouched."""

    def __init__(self, prefix, num_classes=None, image_size=(112, 112), layouts=("insightface", "iter")):
        unknown = set(layouts) - {"insightface", "iter"}
        if unknown or not layouts:
            raise ValueError("layouts must be a non-empty subset of ('insightface', 'iter'), got %r" % (layouts,))
        import mxnet as mx
        self.prefix, self.image_size = prefix, tuple(image_size)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.num_images, self.max_class = 0, -1
        self.class_starts = []                         # InsightFace layout: images before class c
        self._writers, self._staged = {}, {}           # layout -> writer; final path -> temporary path
        for layout in layouts:
            base = prefix if layout == "insightface" else iter_prefix(prefix)
            for ext in (".rec", ".idx"):
                self._staged[base + ext] = temp_path(base + ext)
            self._writers[layout] = mx.recordio.MXIndexedRecordIO(self._staged[base + ".idx"],
                                                                  self._staged[base + ".rec"], "w")
        if "insightface" in self._writers:   # placeholder, rewritten in place once N and C are known (same size)
            self._writers["insightface"].write_idx(0, header_record(0, 0))

    def add(self, class_id, payload):
        """Append one encoded image of class ``class_id``."""
        class_id = int(class_id)
        if class_id < 0 or (self.num_classes is not None and class_id >= self.num_classes):
            raise ValueError("class id %d out of range [0, %s)" % (class_id, self.num_classes))
        key = self.num_images
        if "insightface" in self._writers:
            if class_id < self.max_class:
                raise ValueError("the InsightFace layout needs images in class order: class %d after class %d"
                                 % (class_id, self.max_class))
            while len(self.class_starts) <= class_id:
                self.class_starts.append(key)
            self._writers["insightface"].write_idx(key + 1, pack_record(0, class_id, payload, key + 1))
        if "iter" in self._writers:
            self._writers["iter"].write_idx(key, pack_record(ITER_LABEL_WIDTH, iter_label(class_id, key),
                                                             payload, key))
        self.max_class = max(self.max_class, class_id)
        self.num_images += 1

    def close(self):
        """Finish the files and move them into place; returns {"num_images", "num_classes"}."""
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self):
        if self.num_classes is None:
            self.num_classes = self.max_class + 1
        if self.max_class >= self.num_classes:
            raise ValueError("class id %d out of range [0, %d)" % (self.max_class, self.num_classes))
        if "insightface" in self._writers:
            writer = self._writers["insightface"]
            starts = self.class_starts + [self.num_images] * (self.num_classes - len(self.class_starts))
            ends = starts[1:] + [self.num_images]
            for c, (start, end) in enumerate(zip(starts, ends)):
                writer.write_idx(self.num_images + 1 + c, identity_record(start + 1, end + 1))
            if self.num_classes >= LABEL_SPLIT:
                import logging
                logging.getLogger("recognition.data").warning(
                    "%s.rec: %d classes; InsightFace's float32 labels are exact only below 2^24 (the images-only "
                    "%s.rec keeps them exact)", self.prefix, self.num_classes, iter_prefix(self.prefix))
        for writer in self._writers.values():
            writer.close()
        if "insightface" in self._writers:
            with open(self._staged[self.prefix + ".rec"], "r+b") as f:    # record 0 (the header) is at byte 8
                f.seek(8)
                f.write(header_record(self.num_images, self.num_classes))
        for final, tmp in self._staged.items():
            os.replace(tmp, final)
        self._staged = {}
        write_property(property_path(self.prefix), self.num_classes, self.image_size)
        return {"num_images": self.num_images, "num_classes": self.num_classes}

    def abort(self):
        """Drop what was written; the final paths keep their previous content."""
        for writer in self._writers.values():
            writer.close()
        for tmp in self._staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        self._staged = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
