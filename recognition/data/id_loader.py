"""FFC's id loader: B identities per rank per step, two different images of each (``docs/ffc.md``).

Pass p visits the identities of the index (``identity_index``: identity -> record keys of ``PREFIX_iter.rec``)
once, in an order drawn from (seed, p). With P ranks of B identities, global step t takes the identities at
positions [t * P * B, (t + 1) * P * B) of that order and rank r the r-th B of them, so every rank has the same
``steps_per_pass`` = C // (P * B); the last C mod (P * B) identities of the order sit that pass out. For
every identity of the global step two different images (the same one twice if it has only one) and a mirror
flag per image are drawn from (seed, p, t): what a rank returns at (p, t) is a pure function of (file, seed,
p, t, rank, P, B), and the global batch of a step is the same for any P at one global size P * B.
``batches(p, start_step=S)`` starts at step S without reading anything before it.

Records are read by key with ``rec_format.RecordFile``: ``os.pread`` lets the decoding threads share one file
descriptor, where ``mx.recordio.MXIndexedRecordIO`` seeks a shared handle (it would need a lock) and parses its
``.idx`` into a Python dict of every key (slower to read and to open: docs/benchmarks.md). Images are decoded in
``decode_threads`` threads (OpenCV releases the GIL): a producer thread, which builds step t + 1 while the
trainer works on step t, and ``decode_threads - 1`` helpers. A record that does not read or decode is skipped,
counted and logged; another image of its identity takes its place (the next one in key order, kept different
from the pair's other image while another decodes); an identity none of whose images decodes is replaced by
the next identity of the pass order that has one. Such a file still gives the same batches on every run, as
decoding fails the same way each time.
"""
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np
import mxnet as mx

from recognition.data import identity_index, rec_format
from recognition.data.record_reader import mix_seed, open_record_set

log = logging.getLogger("recognition.data")

_ORDER, _DRAW = 5, 6          # stream tags of the seeded generators (record_reader's and synthetic_reader's < 5)
_LOGGED_SKIPS = 10            # skipped records logged one by one; later ones summed up per pass


class IdBatch(NamedTuple):
    a: mx.nd.NDArray          # (B, 3, H, W) float32 RGB 0-255 on the CPU: one image of each identity
    b: mx.nd.NDArray          # (B, 3, H, W): another image of the same identities
    label: np.ndarray         # (B,) int64 class ids
    keys: np.ndarray          # (B, 2) int64 record keys of a and b (for logs and tests)


class IdentityLoader:
    """Identity batches of an images-only RecordIO file; see the module docstring. ``index``: an
    ``identity_index.IdentityIndex`` (default: ``identity_index.load(rec_path)``)."""

    def __init__(self, rec_path, batch_size, rank=0, num_ranks=1, seed=0, image_size=(112, 112), rand_mirror=True,
                 decode_threads=2, prefetch=1, index=None, progress=True):
        if batch_size < 1 or not 0 <= rank < num_ranks or decode_threads < 1 or prefetch < 0:
            raise ValueError("need batch_size >= 1, 0 <= rank < num_ranks, decode_threads >= 1 and prefetch >= 0; "
                             "got %d, %d, %d, %d, %d" % (batch_size, rank, num_ranks, decode_threads, prefetch))
        self.rec_path = rec_path
        self.batch_size, self.rank, self.num_ranks = int(batch_size), int(rank), int(num_ranks)
        self.seed, self.rand_mirror = int(seed), bool(rand_mirror)
        self.image_size = tuple(int(v) for v in image_size)
        self.decode_threads, self.prefetch = int(decode_threads), int(prefetch)
        self.index = identity_index.load(rec_path, progress=progress) if index is None else index
        self.num_identities = self.index.num_identities
        self.global_batch = self.batch_size * self.num_ranks
        if self.num_identities < self.global_batch:
            raise ValueError("%s has %d identities, fewer than one global step takes (%d ranks x %d identities)"
                             % (rec_path, self.num_identities, self.num_ranks, self.batch_size))
        self.steps_per_pass = self.num_identities // self.global_batch
        self._starts, self._counts = self.index.starts, self.index.counts
        self._offsets = self._record_offsets()
        self.skipped = 0              # records that failed to read or decode, each time a step met them
        self.replaced = 0             # identities without a decodable image, each time a step met them
        self._file = rec_format.RecordFile(rec_path)
        try:
            self._check_image_size()
        except ValueError:
            self._file.close()
            raise
        self._decoders = ThreadPoolExecutor(self.decode_threads - 1, "id-decode") if self.decode_threads > 1 else None
        self._producer = ThreadPoolExecutor(1, "id-batches")
        self._order_cache = (None, None)

    def _record_offsets(self):
        """Byte offset of every record of the index, aligned with ``index.keys``; ValueError naming the file if
        the index names a key the ``.idx`` does not have."""
        idx_path = rec_format.index_path(self.rec_path)
        idx_keys, offsets = rec_format.read_index(idx_path)
        if np.any(idx_keys[1:] < idx_keys[:-1]):      # the tools write keys in order: the common case skips this
            by_key = identity_index.stable_order(idx_keys)
            idx_keys, offsets = idx_keys[by_key], offsets[by_key]
        wanted = self.index.keys.astype(np.int64)
        if idx_keys[-1] - idx_keys[0] == len(idx_keys) - 1:       # keys k0 .. k0 + N - 1 (the tools' 0 .. N-1)
            at = np.clip(wanted - idx_keys[0], 0, len(idx_keys) - 1)
        else:
            at = np.minimum(np.searchsorted(idx_keys, wanted), len(idx_keys) - 1)
        missing = np.flatnonzero(idx_keys[at] != wanted)
        if missing.size:
            raise ValueError("%s: the identity index names key %d, which %s does not have (%d such keys): delete %s "
                             "to rebuild it" % (self.rec_path, wanted[missing[0]], idx_path, missing.size,
                                                identity_index.index_file(self.rec_path)))
        return offsets[at]

    def _check_image_size(self):
        """Refuse images of another size up front: every one of them would be skipped."""
        out = np.empty((1, 3) + self.image_size, np.float32)
        for entry in range(min(len(self._offsets), 8)):     # the first one that decodes tells the size
            reason = self._decode_into(out, 0, entry, None, False)
            if not reason:
                return
            if reason.startswith("image is "):
                raise ValueError("%s key %d: %s: pass image_size as in the property file"
                                 % (self.rec_path, self.index.keys[entry], reason))

    # ------------------------------------------------------------------------------------------ order
    def order(self, pass_index):
        """Identity positions (indexes into ``index.class_ids``) of pass ``pass_index``, in visiting order."""
        cached = self._order_cache                   # one read: the producer thread may replace it
        if cached[0] != pass_index:
            rng = np.random.default_rng(mix_seed(self.seed, pass_index, _ORDER))
            cached = self._order_cache = (pass_index, rng.permutation(self.num_identities))
        return cached[1]

    def step_plan(self, pass_index, step):
        """(identity positions (B,), image picks (B, 2) within each identity, mirror flags (B, 2)) of this rank
        at (pass, step), before any damaged record is met."""
        first = step * self.global_batch
        draws = np.random.default_rng(mix_seed(self.seed, pass_index, step, _DRAW)).random((self.global_batch, 4))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        ids, draws = self.order(pass_index)[first:first + self.global_batch][mine], draws[mine]
        counts = self._counts[ids]
        pick_a = np.minimum((draws[:, 0] * counts).astype(np.int64), counts - 1)
        shift = 1 + np.minimum((draws[:, 1] * (counts - 1)).astype(np.int64), np.maximum(counts - 2, 0))
        pick_b = np.where(counts > 1, (pick_a + shift) % counts, pick_a)    # a different image when there is one
        flips = draws[:, 2:] < 0.5 if self.rand_mirror else np.zeros((self.batch_size, 2), bool)
        return ids, np.stack([pick_a, pick_b], axis=1), flips

    # ------------------------------------------------------------------------------------------ batches
    def batches(self, pass_index, start_step=0):
        """Yield IdBatches for steps start_step .. steps_per_pass - 1 of pass ``pass_index`` (the same ones an
        uninterrupted pass yields from there), preparing up to ``prefetch`` steps ahead."""
        if not 0 <= start_step <= self.steps_per_pass:
            raise ValueError("start_step %d outside [0, %d]" % (start_step, self.steps_per_pass))
        if self._producer is None:
            raise RuntimeError("IdentityLoader of %s is closed" % self.rec_path)
        skipped_before, pending, step = self.skipped, collections.deque(), start_step
        try:
            while step < self.steps_per_pass or pending:
                while step < self.steps_per_pass and len(pending) <= self.prefetch:
                    pending.append(self._producer.submit(self._make_step, pass_index, step))
                    step += 1
                a, b, labels, keys = pending.popleft().result()
                yield IdBatch(mx.nd.from_numpy(a, zero_copy=True), mx.nd.from_numpy(b, zero_copy=True), labels, keys)
        finally:
            for future in pending:
                future.cancel()
        if self.skipped > skipped_before:
            log.warning("rank %d: id pass %d skipped %d unreadable record(s) of %s (%d in all)", self.rank,
                        pass_index, self.skipped - skipped_before, self.rec_path, self.skipped)

    def _make_step(self, pass_index, step):
        """(a, b, labels, keys) of this rank at (pass, step)."""
        ids, picks, flips = self.step_plan(pass_index, step)
        entries = self._starts[ids][:, None] + picks                       # rows of index.keys, (B, 2)
        outs = [np.empty((self.batch_size, 3) + self.image_size, np.float32) for _ in range(2)]
        jobs = [(outs[side], row, entries[row, side], self.index.class_ids[ids[row]], flips[row, side])
                for row in range(self.batch_size) for side in (0, 1)]
        reasons = self._decode_all(jobs)
        failed = collections.defaultdict(dict)                             # row -> {entry: reason}
        for (_, row, entry, _, _), reason in zip(jobs, reasons):
            if reason:
                failed[row][entry] = reason
        labels = self.index.class_ids[ids].copy()
        for row, bad in failed.items():                                    # rare: repaired one at a time
            for entry, reason in bad.items():
                self._note_skip(entry, reason)
            if not self._repair(outs, row, ids[row], entries[row], flips[row], bad):
                labels[row], entries[row] = self._replace(outs, row, pass_index, step, flips[row])
        keys = self.index.keys[entries].astype(np.int64)
        return outs[0], outs[1], labels, keys

    def _decode_all(self, jobs):
        """Reasons ('' = decoded) of ``_decode_into(*job)`` for every job: the producer thread takes one share of
        the jobs, each helper thread another (one hand-off per thread and step, not per image)."""
        shares = [jobs[i::self.decode_threads] for i in range(self.decode_threads)]     # interleaved: balanced

        def decode(share):
            return [self._decode_into(*job) for job in share]
        helpers = [self._decoders.submit(decode, share) for share in shares[1:]] if self._decoders else []
        reasons = [None] * len(jobs)
        reasons[0::self.decode_threads] = decode(shares[0])
        for i, helper in enumerate(helpers, start=1):
            reasons[i::self.decode_threads] = helper.result()
        return reasons

    def _repair(self, outs, row, ident, entries, flips, bad):
        """Fill the failed sides of ``row`` with other images of identity ``ident`` (the next ones in key
        order, different from the other side's while one decodes); ``entries`` (2,) is updated in place.
        False if no image of the identity decodes."""
        start, count = self._starts[ident], self._counts[ident]
        class_id = self.index.class_ids[ident]
        ok = [entries[side] not in bad for side in (0, 1)]
        for side in (0, 1):
            if ok[side]:
                continue
            other = entries[1 - side] if ok[1 - side] else -1
            for k in range(1, count):
                entry = start + (entries[side] - start + k) % count
                if entry in bad or entry == other:
                    continue
                reason = self._decode_into(outs[side], row, entry, class_id, flips[side])
                if not reason:
                    entries[side], ok[side] = entry, True
                    break
                bad[entry] = reason
                self._note_skip(entry, reason)
        if ok[0] != ok[1]:                                # one decodable image: it serves as both
            good = 0 if ok[0] else 1
            self._decode_into(outs[1 - good], row, entries[good], class_id, flips[1 - good])
            entries[1 - good] = entries[good]
        return ok[0] or ok[1]

    def _replace(self, outs, row, pass_index, step, flips):
        """(class id, entries (2,)) of the identity that replaces the undecodable one at ``row``: the next one
        of the pass order with a decodable image."""
        order = self.order(pass_index)
        position = step * self.global_batch + self.rank * self.batch_size + row
        for k in range(1, self.num_identities):
            ident = order[(position + k) % self.num_identities]
            start, count = self._starts[ident], self._counts[ident]
            entries = np.array([start, start + (1 if count > 1 else 0)])
            bad = {}
            for side in (0, 1):
                reason = self._decode_into(outs[side], row, entries[side], self.index.class_ids[ident], flips[side])
                if reason:
                    bad[entries[side]] = reason
                    self._note_skip(entries[side], reason)
            if not bad or self._repair(outs, row, ident, entries, flips, bad):
                self.replaced += 1
                log.warning("rank %d: pass %d step %d: no image of class %d in %s decodes; class %d takes its row",
                            self.rank, pass_index, step, self.index.class_ids[order[position]], self.rec_path,
                            self.index.class_ids[ident])
                return self.index.class_ids[ident], entries
        raise ValueError("%s: no record of the file decodes as a %dx%d image" % ((self.rec_path,) + self.image_size))

    def _note_skip(self, entry, reason):
        self.skipped += 1
        if self.skipped <= _LOGGED_SKIPS:
            log.warning("rank %d: skipped record %d of %s: %s", self.rank, self.index.keys[entry], self.rec_path,
                        reason)

    def _decode_into(self, out, row, entry, class_id, flip):
        """Decode index entry ``entry`` into ``out[row]`` (CHW float32 RGB, mirrored if ``flip``); '' on success,
        else the reason it failed. ``class_id``: what its label must say (None: not checked)."""
        key = int(self.index.keys[entry])
        try:
            flag, labels, payload = rec_format.unpack_record(self._file.read(self._offsets[entry]))
            if flag != rec_format.ITER_LABEL_WIDTH:
                raise ValueError("flag %d, expected %d (not an images-only record)"
                                 % (flag, rec_format.ITER_LABEL_WIDTH))
            class_lo, class_hi, key_lo, key_hi = labels.tolist()      # exact integers in float32 (rec_format)
            split = rec_format.LABEL_SPLIT
            got_class, got_key = class_lo + class_hi * split, key_lo + key_hi * split
            if (class_id is not None and got_class != class_id) or got_key != key:
                raise ValueError("its label says class %d key %d, the identity index class %s key %d (delete %s to "
                                 "rebuild it)" % (got_class, got_key, class_id, key,
                                                  identity_index.index_file(self.rec_path)))
            bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
        except ValueError as err:
            return str(err) or "unreadable record"
        if bgr is None:
            return "payload of %d bytes does not decode as an image" % len(payload)
        if bgr.shape[:2] != self.image_size:
            return "image is %dx%d, expected %dx%d" % (bgr.shape[:2] + self.image_size)
        if flip:
            bgr = cv2.flip(bgr, 1)
        blue, green, red = cv2.split(bgr)                 # contiguous planes: the cheapest way to CHW float
        out[row, 0], out[row, 1], out[row, 2] = red, green, blue
        return ""

    def close(self):
        """Stop the threads and close the file."""
        for pool in (self._producer, self._decoders):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._producer = self._decoders = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_id_loader(cfg, rank, size):
    """The id loader of ``cfg``'s images-only RecordIO set (``cfg.data_dir``/``cfg.rec_prefix``_iter.rec): B =
    ``cfg.batch_size`` identities per rank, ``cfg.preprocess_threads`` decoding threads, seeded by ``cfg.seed``."""
    if cfg.reader != "record":
        raise ValueError("the id loader reads RecordIO files; reader %r has none" % cfg.reader)
    if not cfg.data_dir:
        raise ValueError("dataset %r needs its data folder: pass --data-dir DIR or set PFC_DATA_ROOT" % cfg.dataset)
    found = open_record_set(cfg.data_dir, prefix=cfg.rec_prefix)
    return IdentityLoader(found["rec"], cfg.batch_size, rank=rank, num_ranks=size, seed=cfg.seed,
                          image_size=found["image_size"], decode_threads=cfg.preprocess_threads,
                          progress=rank == 0)
