"""Training batches of InsightFace RecordIO images through ``mx.io.ImageRecordIter``.

``RecordReader`` reads the images-only file (``train_iter.rec``, see ``recognition.data.rec_format``): rank r of P
reads the part ImageRecordIter's indexed splitter gives it (``part_index=r, num_parts=P``: ceil(N / P) records
a part, the last part the rest), shuffled each epoch, as NCHW float32 RGB 0-255 (normalisation is in the
symbol). Class ids come back as exact int64 (the file splits them over two float32 labels).

Exact resume: the batches of epoch e on rank r (images, labels, mirror flags, pad) are a pure function of (file,
seed, e, rank, num_ranks, batch_size). A fresh ImageRecordIter is made per epoch with a seed drawn from (seed,
e); ``recognition.data.record_order`` computes the order it reads the part in from that seed alone, and batch k
holds the records at positions k*B .. k*B+B-1 of that order (the last one completed, as ``round_batch`` does,
with the first records of the splitter's next shuffle). The random mirror is done here with a generator seeded
from (seed, e, rank, step). ``epoch(e, start_step=k)`` reads nothing before step k: it decodes the records of
steps k.. in Python, in that order (for the rest of epoch e only; later epochs use ImageRecordIter again).

Damage: a broken RecordIO header or a truncated file makes MXNet abort the process, so the rank's records are
checked (framing, flag, labels; 48 bytes each, no decoding) when the reader is made. A rank whose part holds
damaged records, or fewer records than one batch, reads in Python instead (same order, same guarantees, slower).
An image that does not decode makes ImageRecordIter raise mid-epoch: the rank then decodes the rest of the epoch
in Python from the step that failed, in the same order. A record left out (damaged, or an image that does not
decode) turns its row into a pad row of its own batch: the batch's other images move up and the last rows repeat
them (flagged by ``Batch.pad``), so every batch depends on its own records only, whatever step the epoch started
at. Skipped records are counted and logged; the epoch still has ``steps_per_epoch`` batches. Re-run
tools/convert_rec.py, which decodes every record, to get a clean file.
"""
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import mxnet as mx

from recognition.data import rec_format, record_order, record_scan
from recognition.data.reader import Batch, BatchReader

log = logging.getLogger("recognition.data")

_MIRROR = 1                                  # stream tag of the mirror generator (4: synthetic_reader)
_LOGGED_SKIPS = 10                                    # skipped records logged one by one; later ones summed up


def mix_seed(*values):
    """A 31-bit seed drawn from the integers ``values`` (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0] & 0x7FFFFFFF)


def open_record_set(data_dir, prefix="train"):
    """Find the images-only files of ``data_dir/prefix`` and read ``property``: {"rec", "idx", "property",
    "num_classes", "image_size", "num_images"}. A missing file raises FileNotFoundError naming it; when only
    InsightFace's files are there, the message gives the tools/convert_rec.py command that makes the others."""
    base = os.path.join(data_dir, prefix)
    rec, idx = rec_format.iter_prefix(base) + ".rec", rec_format.iter_prefix(base) + ".idx"
    prop = os.path.join(data_dir, rec_format.PROPERTY)
    for path in (rec, idx):
        if not os.path.isfile(path):
            if os.path.isfile(base + ".rec") and os.path.isfile(base + ".idx"):
                raise FileNotFoundError(
                    "%s not found: %s holds InsightFace's %s.rec/.idx, which mx.io.ImageRecordIter cannot read "
                    "(header and identity records); make the images-only copy with: python tools/convert_rec.py %s"
                    % (path, data_dir, prefix, base))
            raise FileNotFoundError("training data file not found: %s (pack a folder of images with "
                                    "tools/pack_rec.py, or convert InsightFace's files with tools/convert_rec.py)"
                                    % path)
    num_classes, height, width = rec_format.read_property(prop)
    with rec_format.RecordFile(rec) as f:       # the first image (at byte 0) must have property's size
        try:
            rec_format.decode_image(rec_format.unpack_record(f.read(0))[2], (height, width))
        except rec_format.WrongImageSize as err:
            raise ValueError("%s says %dx%d images, but the first image of %s does not fit: %s"
                             % (prop, height, width, rec, err)) from None
        except ValueError:                      # a damaged first record: the reader skips and counts it
            pass
    with open(idx, "rb") as f:
        num_images = sum(1 for line in f if line.strip())
    return {"rec": rec, "idx": idx, "property": prop, "num_classes": num_classes, "image_size": (height, width),
            "num_images": num_images}


def shard_bounds(num_images, num_ranks, rank):
    """[start, end) of rank's records in file order, cut as ImageRecordIter's indexed splitter cuts them."""
    step = -(-num_images // num_ranks)
    return min(rank * step, num_images), min((rank + 1) * step, num_images)


class RecordReader(BatchReader):
    """Batches of this rank's part of an images-only RecordIO file; see the module docstring."""

    def __init__(self, rec_path, batch_size, num_classes, rank=0, num_ranks=1, seed=0, shuffle=True,
                 rand_mirror=True, image_size=(112, 112), preprocess_threads=2, prefetch_buffer=4,
                 last_batch="discard", max_damaged=0.01):
        if last_batch not in ("discard", "pad"):
            raise ValueError("last_batch must be 'discard' or 'pad', got %r" % (last_batch,))
        if batch_size < 1 or num_classes < 1 or not 0 <= rank < num_ranks:
            raise ValueError("need batch_size >= 1, num_classes >= 1 and 0 <= rank < num_ranks; got %d, %d, %d, %d"
                             % (batch_size, num_classes, rank, num_ranks))
        self.rec_path, self.idx_path = rec_path, rec_format.index_path(rec_path)
        for path in (self.rec_path, self.idx_path):
            if not os.path.isfile(path):
                raise FileNotFoundError("training data file not found: %s" % path)
        self.batch_size, self.num_classes = int(batch_size), int(num_classes)
        self.rank, self.num_ranks, self.seed = int(rank), int(num_ranks), int(seed)
        self.shuffle, self.rand_mirror, self.last_batch = bool(shuffle), bool(rand_mirror), last_batch
        self.image_size = tuple(int(v) for v in image_size)
        self.preprocess_threads, self.prefetch_buffer = int(preprocess_threads), int(prefetch_buffer)
        # records skipped: those found damaged when the reader is made (once; they are left out of every
        # epoch) plus those that fail to decode, each time an epoch meets them
        self.skipped = 0
        self._pool = None

        self.max_damaged = float(max_damaged)
        keys, offsets = self._check_index(*rec_format.read_index(self.idx_path))
        order = np.argsort(offsets, kind="stable")   # the splitter sorts records by offset, whatever their keys
        keys, offsets = keys[order], offsets[order]
        self.num_images = len(offsets)
        bounds = [shard_bounds(self.num_images, num_ranks, r) for r in range(num_ranks)]
        sizes = [end - start for start, end in bounds]
        if last_batch == "discard":
            self.steps_per_epoch = min(sizes) // self.batch_size
        else:
            self.steps_per_epoch = -(-max(sizes) // self.batch_size)
        self.shard = shard_bounds(self.num_images, num_ranks, rank)
        self._check_first_record(offsets)
        self._offsets, self._good = self._check_shard(offsets, keys)
        shard_size = self.shard[1] - self.shard[0]
        self._iter_batches = -(-shard_size // self.batch_size)     # what ImageRecordIter yields (last one padded)
        self.uses_record_iter = (bool(self._good.all()) and shard_size >= self.batch_size
                                 and not self.index_damaged)      # ImageRecordIter would read the bad entries
        if not self.uses_record_iter and shard_size:
            log.info("rank %d: reading records %d..%d of %s in Python (%s)", rank, self.shard[0], self.shard[1] - 1,
                     rec_path, "damaged records" if not self._good.all() else "fewer records than one batch")

    # ------------------------------------------------------------------------------------------ checks
    def _check_index(self, keys, offsets):
        """The index's (keys, offsets) without the entries that point outside the record file where the file is
        not merely cut short: those are the index's damage, not the file's (their records are skipped, named in a
        warning, and count against ``max_damaged``). Entries past the end of a truncated file (the last ones of
        the index, in order) stay: their records are the file's damage, found by ``_check_shard``."""
        size = os.path.getsize(self.rec_path)
        bad = record_scan.bad_index_entries(offsets, size)
        self.index_damaged = int(np.count_nonzero(bad))
        if not self.index_damaged:
            return keys, offsets
        first = int(np.flatnonzero(bad)[0])
        where = ("%s: %d of its %d entries point outside %s (%d bytes; first: key %d at byte %d): the index is "
                 "damaged, not the record file (rebuild the index: python tools/convert_rec.py, or re-pack)"
                 % (self.idx_path, self.index_damaged, len(offsets), self.rec_path, size, keys[first],
                    offsets[first]))
        if self.index_damaged > self.max_damaged * len(offsets):
            raise ValueError("%s; more than --max-damaged %g allows" % (where, self.max_damaged))
        if self.rank == 0:
            log.warning("%s; their records are skipped", where)
        return keys[~bad], offsets[~bad]

    def _check_first_record(self, offsets):
        """Refuse a file in another layout (e.g. InsightFace's, whose record 0 is a header) up front."""
        with rec_format.RecordFile(self.rec_path) as f:
            try:
                flag, labels, payload = rec_format.unpack_record(f.read(offsets[0]))
            except ValueError as err:
                log.warning("%s: record 0 is damaged (%s)", self.rec_path, err)
                return
        if flag != rec_format.ITER_LABEL_WIDTH or not payload:
            raise ValueError("%s is not an images-only file of this project (record 0 has flag %d and a %d-byte "
                             "payload; expected flag 4 and an image): make one with: python tools/convert_rec.py "
                             "PREFIX, or tools/pack_rec.py" % (self.rec_path, flag, len(payload)))
        # A size mismatch would leave every batch padding: stop here. (An undecodable record 0 raises a plain
        # ValueError, let through: it is skipped and counted later like any damaged record.)
        try:
            rec_format.decode_image(payload, self.image_size)
        except rec_format.WrongImageSize as err:
            raise ValueError("%s record 0: %s: pass image_size as in the property file" % (self.rec_path, err))
        except ValueError:
            return

    def _check_shard(self, offsets, index_keys):
        """(offsets, good mask) of this rank's records after checking every one without decoding it; a class id
        >= num_classes raises ValueError naming the record."""
        start, end = self.shard
        mine = offsets[start:end]
        ends = np.append(offsets[start + 1:end + 1], os.path.getsize(self.rec_path))[:len(mine)]
        began, last = time.monotonic(), [time.monotonic()]

        def progress(done, total):
            now = time.monotonic()
            if now - last[0] >= 10 and done < total:
                last[0] = now
                speed = done / (now - began)
                log.info("rank %d: checked %d / %d records of %s (%.0f records/s, ETA %.0f s)",
                         self.rank, done, total, self.rec_path, speed, (total - done) / speed)

        classes, keys = record_scan.scan_iter_records(self.rec_path, mine, ends, progress=progress)
        good = (classes >= 0) & (keys == index_keys[start:end])     # each record is the one its entry names
        too_big = np.flatnonzero(good & (classes >= self.num_classes))
        if too_big.size:
            i = too_big[0]
            raise ValueError("%s: record %d (byte %d) has class id %d >= num_classes %d (%d record(s) of rank %d "
                             "out of range): check property / num_classes" % (
                                 self.rec_path, start + i, mine[i], classes[i], self.num_classes, too_big.size,
                                 self.rank))
        damaged = np.flatnonzero(~good)
        if damaged.size > self.max_damaged * max(len(mine), 1):
            raise ValueError("%s: %d of the %d records of rank %d (records %d..%d) are damaged (first at bytes %s), "
                             "more than --max-damaged %g allows: rebuild the file (tools/convert_rec.py, "
                             "tools/pack_rec.py) or raise --max-damaged" % (
                                 self.rec_path, damaged.size, len(mine), self.rank, start, end - 1,
                                 ", ".join(str(int(b)) for b in mine[damaged[:5]]), self.max_damaged))
        if damaged.size:
            self.skipped += int(damaged.size)
            log.warning("rank %d: %d damaged record(s) in %s (first: record %d at byte %d) will be skipped every "
                        "epoch; re-run tools/convert_rec.py to make a clean file", self.rank, damaged.size,
                        self.rec_path, start + damaged[0], mine[damaged[0]])
        return mine, good

    # ------------------------------------------------------------------------------------------ batches
    def epoch(self, epoch, start_step=0):
        """Yield exactly ``steps_per_epoch - start_step`` Batches: steps start_step .. steps_per_epoch-1 of
        ``epoch`` (the same batches an uninterrupted pass yields from there; nothing before them is read)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError("start_step %d outside [0, %d]" % (start_step, self.steps_per_epoch))
        if start_step == self.steps_per_epoch:
            return
        if start_step:
            log.info("rank %d: epoch %d resumes at step %d: decoding its last %d batches in Python in "
                     "ImageRecordIter's order, without reading the records of the %d steps before", self.rank, epoch,
                     start_step, self.steps_per_epoch - start_step, start_step)
        skipped_before = self.skipped
        if self.uses_record_iter and not start_step:
            source = self._record_iter_batches(epoch)
        else:
            source = self._python_batches(epoch, start_step)
        try:
            for step, (data, labels, pad) in enumerate(source, start_step):
                yield self._finish(data, labels, pad, epoch, step)
        finally:
            source.close()
        if self.skipped > skipped_before:
            log.warning("rank %d: epoch %d skipped %d damaged record(s) (%d in all)", self.rank, epoch,
                        self.skipped - skipped_before, self.skipped)

    def _finish(self, data, labels, pad, epoch, step):
        """Random mirror (seeded by seed, epoch, rank, step) and wrap as a Batch."""
        if self.rand_mirror:
            flip = np.random.default_rng(mix_seed(self.seed, epoch, self.rank, step, _MIRROR)).random(len(data)) < 0.5
            for row in np.flatnonzero(flip):
                planes = data[row].reshape(-1, data.shape[-1])     # a view: C*H rows of W pixels
                cv2.flip(planes, 1, dst=planes)                    # in place, ~8x faster than a NumPy reverse
        return Batch(mx.nd.from_numpy(data, zero_copy=True), labels.astype(np.int64), int(pad))

    def _make_iter(self, epoch):
        return mx.io.ImageRecordIter(
            path_imgrec=self.rec_path, path_imgidx=self.idx_path, data_shape=(3,) + self.image_size,
            batch_size=self.batch_size, label_width=rec_format.ITER_LABEL_WIDTH, shuffle=self.shuffle,
            seed=mix_seed(self.seed, epoch), part_index=self.rank, num_parts=self.num_ranks,
            preprocess_threads=self.preprocess_threads, prefetch_buffer=self.prefetch_buffer, round_batch=True,
            rand_mirror=False, verbose=False)

    def _record_iter_batches(self, epoch):
        """(data, labels, pad) for every step of the epoch from ImageRecordIter; Python takes over on an error."""
        last, it = None, None
        try:
            for step in range(self.steps_per_epoch):
                if step >= self._iter_batches:                # "pad": this part is used up, a larger one is not
                    yield self._pad_batch(last)
                    continue
                try:
                    if it is None:
                        it = self._make_iter(epoch)
                    batch = it.next()
                except mx.base.MXNetError as err:
                    log.warning("rank %d: epoch %d step %d: ImageRecordIter failed on %s (%s); decoding the rest of "
                                "the epoch in Python, in the same order", self.rank, epoch, step, self.rec_path,
                                str(err).strip().splitlines()[-1])
                    it = None
                    yield from self._python_batches(epoch, step)
                    return
                classes, keys = rec_format.decode_iter_labels(batch.label[0].asnumpy())
                self._check_classes(classes, keys)
                data = batch.data[0].asnumpy()
                if step == self._iter_batches - 1 < self.steps_per_epoch - 1:
                    last = (data.copy(), classes)              # kept unmirrored for the all-padding batches
                yield data, classes, batch.pad
        finally:
            del it

    def _check_classes(self, classes, keys):
        bad = np.flatnonzero((classes < 0) | (classes >= self.num_classes))
        if bad.size:
            raise ValueError("%s: record %d has class id %d outside [0, %d)"
                             % (self.rec_path, keys[bad[0]], classes[bad[0]], self.num_classes))

    def _pad_batch(self, last):
        """An all-padding batch: the previous batch again (or zeros), every row flagged as pad."""
        if last is None:
            data = np.zeros((self.batch_size, 3) + self.image_size, np.float32)
            return data, np.zeros(self.batch_size, np.int64), self.batch_size
        return last[0].copy(), last[1].copy(), self.batch_size

    # ------------------------------------------------------------------------------------------ Python path
    def _python_batches(self, epoch, first_step):
        """(data, labels, pad) for steps first_step .. steps_per_epoch-1, the batches ImageRecordIter would give,
        decoded here; only the records of those steps are read, the next batch while the current one is used."""
        passes = record_order.SplitterOrder(len(self._offsets), mix_seed(self.seed, epoch), self.shuffle)
        order, next_pass = passes.next_pass(), []
        stop = min(self._iter_batches, self.steps_per_epoch)         # steps that hold records of this part

        def start(step):
            real = order[step * self.batch_size:(step + 1) * self.batch_size]
            if len(real) == self.batch_size:
                return self._start_batch(real, real[:0])
            if not next_pass:                    # round_batch: the next shuffle's first records end the part
                next_pass.append(passes.next_pass())
            return self._start_batch(real, next_pass[0][:self.batch_size - len(real)])

        last = None
        if 0 < stop <= first_step:                                    # all-padding steps repeat the part's last batch
            data, labels, _ = self._finish_batch(start(stop - 1))
            last = (data, labels)
        pending = start(first_step) if first_step < stop else None
        for step in range(first_step, self.steps_per_epoch):
            if step >= stop:
                yield self._pad_batch(last)
                continue
            current, pending = pending, (start(step + 1) if step + 1 < stop else None)
            data, labels, pad = self._finish_batch(current)
            if step == stop - 1 < self.steps_per_epoch - 1:
                last = (data.copy(), labels)                           # kept unmirrored for the all-padding batches
            yield data, labels, pad

    def _start_batch(self, real, wrap):
        """Start decoding one batch's records (positions in this part: its own, then the pad rows of round_batch)
        in the decoding threads; returns the job for ``_finish_batch``."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.preprocess_threads), thread_name_prefix="record-decode")
            self._file = rec_format.RecordFile(self.rec_path)
        positions = np.concatenate([real, wrap])
        data = np.empty((self.batch_size, 3) + self.image_size, np.float32)
        parts = np.array_split(np.arange(len(positions)), max(1, min(self.preprocess_threads, len(positions))))
        futures = [self._pool.submit(self._decode_rows, data, positions, rows) for rows in parts if len(rows)]
        return data, positions, len(real), futures

    def _finish_batch(self, job):
        """(data, labels, pad) of a started batch. Rows whose record is left out are dropped, the rows after them
        move up, and the batch is filled by repeating its rows; pad counts every row that is not its own image."""
        data, positions, num_real, futures = job
        results = [result for future in futures for result in future.result()]
        classes = np.array([class_id for class_id, _ in results], np.int64)
        for position, (class_id, reason) in zip(positions, results):
            if class_id < 0 and reason:
                self._count_skip(position, reason)
        rows = np.flatnonzero(classes >= 0)
        if not rows.size:
            return self._pad_batch(None)
        if rows.size < self.batch_size:
            rows = rows[np.arange(self.batch_size) % rows.size]
            data = data[rows]
        return data, classes[rows], self.batch_size - int((classes[:num_real] >= 0).sum())

    def _count_skip(self, position, reason):
        self.skipped += 1
        if self.skipped <= _LOGGED_SKIPS:
            log.warning("rank %d: skipped record %d of %s: %s", self.rank, self.shard[0] + position, self.rec_path,
                        reason)

    def _decode_rows(self, data, positions, rows):
        """Decode the records at ``positions[rows]`` into ``data[rows]`` (in a decoding thread; OpenCV releases the
        GIL); [(class id, "") or (-1, why it was left out)] per row. Records found damaged when the reader was
        made give (-1, ""): they were counted then."""
        results = []
        for row in rows:
            position = int(positions[row])
            key = self.shard[0] + position
            if not self._good[position]:
                results.append((-1, ""))
                continue
            try:
                flag, labels, payload = rec_format.unpack_record(self._file.read(self._offsets[position]))
                if flag != rec_format.ITER_LABEL_WIDTH:
                    raise ValueError("flag %d, expected %d" % (flag, rec_format.ITER_LABEL_WIDTH))
                image = rec_format.decode_image(payload, self.image_size)
            except ValueError as err:
                results.append((-1, str(err)))
                continue
            class_id = rec_format.exact_class_id(flag, labels, "%s record %d" % (self.rec_path, key))
            self._check_classes(np.array([class_id]), np.array([key]))
            data[row] = image.transpose(2, 0, 1)
            results.append((class_id, ""))
        return results

    def close(self):
        """Stop the decoding threads of the Python path (if it ran)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._file.close()
            self._pool = None
