"""Checks of an images-only record set without decoding its images: the index's entries that point outside the
record file (``bad_index_entries``), and every record's framing, flag, labels and payload (``scan_iter_records``,
vectorised: 48 bytes read per record)."""
import os

import numpy as np

from recognition.data.rec_format import IR_SIZE, ITER_LABEL_WIDTH, LABEL_SPLIT, MAGIC, RecordFile, unpack_record


def bad_index_entries(offsets, size):
    """Mask of the index entries (in file order) that are the index's damage: offsets outside a record file of
    ``size`` bytes, except a tail of in-order entries past the end, which is the file's damage (a copy cut short:
    its records are found damaged by ``scan_iter_records``)."""
    outside = (offsets < 0) | (offsets >= size)
    inside = np.flatnonzero(~outside)
    cut = inside[-1] + 1 if inside.size else 0              # index lines from here on all lie past the end
    if bool(np.all(np.diff(offsets[cut:]) > 0)) and (cut == 0 or offsets[cut - 1] < size):
        outside[cut:] = offsets[cut:] < 0
    return outside


def scan_iter_records(rec_path, offsets, ends, progress=None, chunk=1 << 16):
    """Check the images-only records at ``offsets`` without decoding their images: RecordIO framing, each record
    ending at or before ``ends[i]`` (the next indexed record's offset, or the file size: bytes of a record the
    index lost may lie between), flag 4, integer labels and a
    non-empty payload. Reads 48 bytes a record (vectorised); multi-part records and records near the end of the
    file go through :class:`RecordFile`. Returns (class ids, keys) int64 arrays, -1 where a record is damaged.
    ``progress(done, total)`` is called after every chunk."""
    offsets, ends = np.asarray(offsets, np.int64), np.asarray(ends, np.int64)
    n = len(offsets)
    classes, keys = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    size = os.path.getsize(rec_path)
    head = 8 + IR_SIZE + 4 * ITER_LABEL_WIDTH         # framing + IRHeader + the 4 labels
    data = np.memmap(rec_path, np.uint8, "r") if size else np.zeros(0, np.uint8)
    slow = []
    for lo in range(0, n, chunk):
        off, end = offsets[lo:lo + chunk], ends[lo:lo + chunk]
        fast = np.flatnonzero(off + head <= np.minimum(end, size))
        slow.extend(lo + np.setdiff1d(np.arange(len(off)), fast))
        raw = data[off[fast, None] + np.arange(head)]
        magic, lrec = raw[:, 0:4].copy().view("<u4")[:, 0], raw[:, 4:8].copy().view("<u4")[:, 0]
        flag = raw[:, 8:12].copy().view("<u4")[:, 0]
        parts = raw[:, 8 + IR_SIZE:head].copy().view("<f4").astype(np.float64)
        cflag, length = lrec >> 29, (lrec & ((1 << 29) - 1)).astype(np.int64)
        multipart = (magic == MAGIC) & (cflag == 1)
        slow.extend(lo + fast[multipart])
        good = ((magic == MAGIC) & (cflag == 0) & (flag == ITER_LABEL_WIDTH) & (length > head - 8)
                & (off[fast] + 8 + ((length + 3) & ~3) <= end[fast]) & (end[fast] <= size) & _exact_parts(parts))
        rows = lo + fast[good]
        classes[rows] = (parts[good, 0] + parts[good, 1] * LABEL_SPLIT).astype(np.int64)
        keys[rows] = (parts[good, 2] + parts[good, 3] * LABEL_SPLIT).astype(np.int64)
        if progress:
            progress(min(lo + chunk, n), n)
    if slow:
        with RecordFile(rec_path) as f:
            for i in slow:
                try:
                    record, stop = f.read_with_end(offsets[i])
                    flag, labels, payload = unpack_record(record)
                except ValueError:
                    continue
                parts = labels.astype(np.float64)[None] if flag == ITER_LABEL_WIDTH else None
                if stop <= ends[i] and parts is not None and payload and _exact_parts(parts)[0]:
                    classes[i] = int(parts[0, 0] + parts[0, 1] * LABEL_SPLIT)
                    keys[i] = int(parts[0, 2] + parts[0, 3] * LABEL_SPLIT)
    return classes, keys


def _exact_parts(parts):
    """Rows whose four label parts are integers, the low parts below 2^24 (the images-only encoding)."""
    return ((parts == np.floor(parts)).all(axis=1) & (parts >= 0).all(axis=1)
            & (parts[:, 0] < LABEL_SPLIT) & (parts[:, 2] < LABEL_SPLIT))


# ------------------------------------------------------------------------------------------------ writing
