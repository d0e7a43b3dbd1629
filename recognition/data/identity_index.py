"""Identity -> image keys of an images-only RecordIO file (``PREFIX_iter.rec``), for FFC's id loader.

The index file, ``PREFIX_iter.ids.npz`` beside the ``.rec`` (NumPy's uncompressed npz; no pickle), holds:
    class_ids  int64 (C,)     the identities that have at least one image, ascending (exact above 2^24)
    starts     int64 (C + 1,) CSR offsets: identity i owns keys[starts[i]:starts[i + 1]], at least one
    keys       uint32 or int64 (N,) record keys (``.idx`` keys = the keys in the records' labels), ascending
               within an identity; uint32 when every key fits (Glint360K: 17 M keys in 69 MB)
    stamp      int64 (5,)     .rec size, .rec mtime (ns), .idx size, .idx mtime (ns), records in the .idx
    left_out   int64 ()       records the build found damaged (framing, flag, labels) and left out
    version    int64 ()
tools/pack_rec.py and tools/convert_rec.py write it with the data (``write_for_new_file``). ``load`` checks the
stamp and rebuilds a missing, stale or unreadable index from the record headers (48 bytes read a record, no
image decoded), writing it back when the folder is writable. The build is vectorised and O(images): a header
scan in chunks and a stable LSD radix sort by class (``stable_order``), no per-record Python object; at
Glint360K's 17 M records it takes about 16 CPU seconds and 1.9 GB at its peak (docs/benchmarks.md).
"""
import contextlib
import fcntl
import logging
import os
import time
import zipfile
from typing import NamedTuple

import numpy as np

from recognition.data import rec_format, record_scan
from utils import fileio

log = logging.getLogger("recognition.data")

INDEX_SUFFIX = ".ids.npz"
VERSION = 1
STAMP_FIELDS = ("rec_size", "rec_mtime_ns", "idx_size", "idx_mtime_ns", "num_records")


class IdentityIndex(NamedTuple):
    class_ids: np.ndarray    # int64 (C,), ascending
    starts: np.ndarray       # int64 (C + 1,)
    keys: np.ndarray         # (N,) record keys grouped by identity
    left_out: int = 0        # damaged records of the file that are not in the index

    @property
    def num_identities(self):
        return len(self.class_ids)

    @property
    def counts(self):
        """Images of each identity, (C,) int64."""
        return np.diff(self.starts)

    def keys_of(self, class_id):
        """Record keys (int64) of identity ``class_id``; KeyError if it has no image."""
        i = int(np.searchsorted(self.class_ids, class_id))
        if i == len(self.class_ids) or self.class_ids[i] != class_id:
            raise KeyError("class id %d has no image in the index" % class_id)
        return self.keys[self.starts[i]:self.starts[i + 1]].astype(np.int64)


def index_file(rec_path):
    """'d/train_iter.rec' -> 'd/train_iter.ids.npz'."""
    return os.path.splitext(rec_path)[0] + INDEX_SUFFIX


def group(class_ids, keys, left_out=0):
    """The IdentityIndex of records with class ``class_ids[i]`` and key ``keys[i]`` (any order)."""
    class_ids, keys = np.asarray(class_ids, np.int64), np.asarray(keys, np.int64)
    if class_ids.shape != keys.shape or class_ids.ndim != 1:
        raise ValueError("class ids %s and keys %s must be two vectors of one length" % (class_ids.shape, keys.shape))
    if class_ids.size and class_ids.min() < 0:
        raise ValueError("class id %d is negative" % class_ids.min())
    if np.any(keys[1:] < keys[:-1]):              # tools write keys 0..N-1 in order: the common case skips this
        by_key = stable_order(keys)
        class_ids, keys = class_ids[by_key], keys[by_key]
    by_class = stable_order(class_ids)            # stable: keys stay ascending within an identity
    class_ids, keys = class_ids[by_class], keys[by_class]
    first = np.flatnonzero(np.diff(class_ids)) + 1
    starts = np.concatenate([[0], first, [len(keys)]]).astype(np.int64) if len(keys) else np.zeros(1, np.int64)
    return IdentityIndex(class_ids[starts[:-1]].copy(), starts, _compact(keys), int(left_out))


def stable_order(values):
    """``np.argsort(values, kind="stable")`` in O(N) for non-negative integers: least significant 16-bit digit
    first, each pass NumPy's radix sort of uint16 (int64 argsort is a comparison sort: 2-3x slower at 17 M)."""
    values = np.asarray(values, np.int64)
    if not values.size or values.min() < 0:
        return np.argsort(values, kind="stable")
    order, top, shift = None, int(values.max()), 0
    while order is None or top >> shift:
        digits = ((values if order is None else values[order]) >> shift).astype(np.uint16)   # keeps the low 16
        step = np.argsort(digits, kind="stable")
        order = step if order is None else order[step]
        shift += 16
    return order


def _compact(keys):
    return keys.astype(np.uint32) if not keys.size or (keys.min() >= 0 and keys.max() < 2 ** 32) else keys


# ------------------------------------------------------------------------------------------------ file I/O
def file_stamp(rec_path, num_records):
    """The stamp an index of ``rec_path`` carries: sizes and mtimes of the .rec and .idx, and the record count."""
    rec, idx = os.stat(rec_path), os.stat(rec_format.index_path(rec_path))
    return np.array([rec.st_size, rec.st_mtime_ns, idx.st_size, idx.st_mtime_ns, num_records], np.int64)


def count_records(idx_path, block=1 << 24):
    """Lines of a ``.idx`` file (its records), counted in blocks without parsing them."""
    lines, last = 0, b"\n"
    with open(idx_path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            lines += data.count(b"\n")
            last = data[-1:]
    return lines + (last != b"\n")


def write(path, index, stamp):
    """Write ``index`` with ``stamp`` to ``path`` atomically."""
    fileio.atomic_save_numpy(path, {
        "class_ids": index.class_ids, "starts": index.starts, "keys": index.keys, "stamp": stamp,
        "left_out": np.int64(index.left_out), "version": np.int64(VERSION)})


def read(path):
    """(IdentityIndex, stamp) of an index file; ValueError naming ``path`` if it is not a valid one."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:    # a zip or .npy that does not parse
        raise ValueError("%s is not a readable identity index: %s" % (path, err)) from None
    missing = {"class_ids", "starts", "keys", "stamp", "left_out", "version"} - set(arrays)
    if missing:
        raise ValueError("%s is not an identity index: no %s" % (path, ", ".join(sorted(missing))))
    version = arrays["version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != VERSION:
        raise ValueError("%s has index version %s, this code reads %d" % (path, version, VERSION))
    class_ids, starts, keys, stamp = (arrays[k] for k in ("class_ids", "starts", "keys", "stamp"))
    ok = (all(a.ndim == 1 and a.dtype.kind in "iu" for a in (class_ids, starts, keys, stamp))
          and stamp.size == len(STAMP_FIELDS) and starts.size == class_ids.size + 1 and starts[0] == 0
          and starts[-1] == keys.size and np.all(np.diff(starts) > 0) and np.all(np.diff(class_ids) > 0)
          and (class_ids.size == 0 or class_ids[0] >= 0))
    if not ok:
        raise ValueError("%s is a damaged identity index (shapes %s, %s, %s do not form identity -> keys)"
                         % (path, class_ids.shape, starts.shape, keys.shape))
    index = IdentityIndex(class_ids.astype(np.int64), starts.astype(np.int64), keys, int(arrays["left_out"]))
    return index, stamp.astype(np.int64)


def write_for_new_file(rec_path, class_ids):
    """Index the images-only file a tool has just written: record k (key k) has class ``class_ids[k]``."""
    class_ids = np.asarray(class_ids, np.int64)
    index = group(class_ids, np.arange(len(class_ids), dtype=np.int64))
    path = index_file(rec_path)
    write(path, index, file_stamp(rec_path, len(class_ids)))
    log.info("wrote the identity index %s (%d identities, %d images)", path, index.num_identities, len(class_ids))
    return path


# ------------------------------------------------------------------------------------------------ building
def scan(rec_path, progress=True):
    """Build the IdentityIndex of ``rec_path`` from its record headers (no image is decoded). Records whose
    framing, flag or labels are damaged, or whose label key differs from their ``.idx`` key, are left out,
    counted and logged. ``progress``: a tqdm bar."""
    from tqdm import tqdm
    idx_path = rec_format.index_path(rec_path)
    idx_keys, offsets = rec_format.read_index(idx_path)
    if np.any(offsets[1:] < offsets[:-1]):       # MXNet's writer lists records in file order: usually skipped
        by_offset = stable_order(offsets)
        offsets, idx_keys = offsets[by_offset], idx_keys[by_offset]
    ends = np.append(offsets[1:], os.path.getsize(rec_path))
    with tqdm(total=len(offsets), unit="rec", unit_scale=True, desc="index " + os.path.basename(rec_path),
              disable=not progress, mininterval=1.0) as bar:
        def advance(done, total):
            bar.update(done - bar.n)
        classes, label_keys = record_scan.scan_iter_records(rec_path, offsets, ends, progress=advance)
    good = (classes >= 0) & (label_keys == idx_keys)
    bad = np.flatnonzero(~good)
    if bad.size:
        log.warning("%s: %d record(s) left out of the identity index: damaged header or label key != .idx key "
                    "(first: key %d at byte %d); re-run tools/convert_rec.py for a clean file", rec_path, bad.size,
                    idx_keys[bad[0]], offsets[bad[0]])
    return group(classes[good], idx_keys[good], left_out=bad.size)


def load(rec_path, progress=True):
    """The IdentityIndex of ``rec_path``: read from ``index_file(rec_path)`` when its stamp matches the files,
    else built by :func:`scan` (with a warning when a stale or unreadable index was there) and written beside
    the file, or kept in memory when the folder is not writable. Processes that start together (the ranks of a
    host) build it once: the others wait for the first and read what it wrote."""
    for path in (rec_path, rec_format.index_path(rec_path)):
        if not os.path.isfile(path):
            raise FileNotFoundError("training data file not found: %s" % path)
    path = index_file(rec_path)
    stamp = file_stamp(rec_path, count_records(rec_format.index_path(rec_path)))
    index = _read_fresh(path, stamp, rec_path, say=True)
    if index is not None:
        return index
    with _build_lock(rec_path):
        index = _read_fresh(path, stamp, rec_path, say=False)       # another process built it while we waited
        if index is not None:
            return index
        began = time.monotonic()
        index = scan(rec_path, progress=progress)
        log.info("indexed %d images of %d identities in %s (%.1f s)", len(index.keys), index.num_identities,
                 rec_path, time.monotonic() - began)
        try:
            write(path, index, stamp)
        except OSError as err:
            log.warning("cannot write %s (%s): the identity index stays in memory and is rebuilt next time", path,
                        err)
    return index


def _read_fresh(path, stamp, rec_path, say):
    """The index at ``path`` if it is readable and carries ``stamp``, else None (and, if ``say``, a log line)."""
    if not os.path.exists(path):
        if say:
            log.info("%s not found: building it from the record headers of %s", path, rec_path)
        return None
    try:
        index, saved = read(path)
    except ValueError as err:
        if say:
            log.warning("%s; rebuilding it", err)
        return None
    if np.array_equal(saved, stamp):
        return index
    if say:
        changed = [name for name, a, b in zip(STAMP_FIELDS, saved, stamp) if a != b]
        log.warning("%s is stale (%s of %s changed since it was written); rebuilding it", path, ", ".join(changed),
                    rec_path)
    return None


@contextlib.contextmanager
def _build_lock(rec_path):
    """An exclusive ``flock`` on the ``.idx`` file while the index is built, so that processes of one host do not
    all build it (each build holds about 110 bytes a record). A file system that refuses the lock (some network
    file systems) only loses that saving."""
    fd = os.open(rec_format.index_path(rec_path), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.info("no lock on %s (%s): building the identity index without one", rec_format.index_path(rec_path),
                     err)
        yield
    finally:
        os.close(fd)                                  # releases the lock
