"""The Partial FC operator as the head of Partial FC's training method (``method.py``).

The head turns a batch of embeddings and labels into (loss, d loss / d embeddings), updates its own parameters
with ``update(lr)``, and saves / restores its state in a checkpoint folder. The training loop does not see it:
it drives a training method, and FFC is another method (``recognition/ffc/method.py``), with a queue of its own.
"""
import glob
import json
import os

import numpy as np

from recognition import dist
from recognition.partial_fc.operator import PartialFC

_SHARD_PATTERN = "centres_%010d_%010d.%s.npy"


class PartialFCHead:
    """The Partial FC operator as a training head, with world-size-independent checkpoints.

    Each rank writes its slice of W and its momentum as ``centres_<start>_<end>.{weight,momentum}.npy``; on
    restore every rank reads the pieces of whatever files overlap its own slice, so a checkpoint written by N
    ranks resumes on M ranks with every class kept.

    The memory bank's I/O is pipelined (``PartialFC(pipeline=True)``) unless ``cfg.bank_pipeline`` is False:
    ``prepare(labels)`` before the backbone's forward starts the step's pull, ``update`` queues the push.
    """

    def __init__(self, cfg, ctx):
        self.pfc = PartialFC(cfg.num_classes, cfg.embedding_size, sample_ratio=cfg.sample_ratio,
                             margins=tuple(cfg.margins), scale=cfg.scale, ctx=ctx,
                             bank_location=cfg.bank_location, interclass_filter=cfg.interclass_filter,
                             momentum=cfg.momentum, weight_decay=cfg.fc_weight_decay, seed=cfg.seed,
                             disk_dir=cfg.bank_dir, pipeline=cfg.bank_pipeline)

    def prepare(self, labels):
        """Gather the step's labels and start its bank pull (before the backbone's forward)."""
        self.pfc.prepare(labels)

    def forward_backward(self, embeddings, labels):
        return self.pfc.forward_backward(embeddings, labels)

    def update(self, lr):
        self.pfc.update(lr)

    @property
    def timings(self):
        return self.pfc.timings

    def close(self):
        """Finish the queued bank jobs, stop the bank thread, release the bank."""
        self.pfc.close()

    def save(self, folder, chunk_rows=1 << 16):
        """Write this rank's shard (weight and momentum) into ``folder``; rows are copied in chunks."""
        pfc = self.pfc
        pfc.flush(agree=True)       # every queued update is in the bank, on every rank, or every rank raises
        start, end = pfc.class_start, pfc.class_start + pfc.num_local
        for kind, column in (("weight", 0), ("momentum", 1)):
            path = os.path.join(folder, _SHARD_PATTERN % (start, end, kind))
            out = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float32,
                                            shape=(pfc.num_local, pfc.embedding_size))
            for lo in range(0, pfc.num_local, chunk_rows):
                hi = min(lo + chunk_rows, pfc.num_local)
                out[lo:hi] = pfc.bank.read(lo, hi)[column]
            out.flush()
            del out
            os.replace(path + ".tmp", path)
        with open(os.path.join(folder, "head_rank%d.json" % dist.rank()), "w") as f:
            json.dump({"pfc_step": pfc.step, "class_start": start, "class_end": end}, f)

    def snapshot(self):
        """({"pfc_step"}, {"weight", "momentum"}): copies of this rank's shard after every queued update (a
        collective: every rank raises when any rank's bank failed)."""
        pfc = self.pfc
        pfc.flush(agree=True)
        weight, momentum = pfc.bank.read(0, pfc.num_local)
        return {"pfc_step": pfc.step}, {"weight": weight, "momentum": momentum}

    def load_snapshot(self, shared, rows):
        """This rank's shard from ``rows`` (its rows, weight and momentum) and the step from ``shared``."""
        pfc = self.pfc
        pfc.flush()
        for name in ("weight", "momentum"):
            if rows[name].shape != (pfc.num_local, pfc.embedding_size):
                raise ValueError("Partial FC snapshot: %s rows %s, this rank holds %s" % (
                    name, rows[name].shape, (pfc.num_local, pfc.embedding_size)))
        pfc.bank.write(0, rows["weight"], rows["momentum"])
        pfc.step = int(shared["pfc_step"])

    def load(self, folder):
        """Fill this rank's shard from the shard files in ``folder`` (any world size wrote them)."""
        pfc = self.pfc
        pfc.flush()
        start, end = pfc.class_start, pfc.class_start + pfc.num_local
        pieces = _shard_files(folder)
        total = pieces[-1][0][1]
        if total != pfc.num_classes:
            raise ValueError("checkpoint %s holds %d classes, this run has %d" % (folder, total, pfc.num_classes))
        covered = 0
        for (lo, hi), paths in pieces:
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            weight = np.load(paths["weight"], mmap_mode="r")
            momentum = np.load(paths["momentum"], mmap_mode="r")
            if weight.shape[1] != pfc.embedding_size:
                raise ValueError("%s holds %d-d centres, this run uses %d" % (paths["weight"], weight.shape[1],
                                                                               pfc.embedding_size))
            pfc.bank.write(a - start, np.asarray(weight[a - lo:b - lo]), np.asarray(momentum[a - lo:b - lo]))
            covered += b - a
        if covered != pfc.num_local:
            raise ValueError("checkpoint %s covers %d of this rank's %d classes [%d, %d): shard files missing"
                             % (folder, covered, pfc.num_local, start, end))
        steps = [json.load(open(p))["pfc_step"] for p in glob.glob(os.path.join(folder, "head_rank*.json"))]
        pfc.step = max(steps) if steps else 0


def _shard_files(folder):
    """[((start, end), {'weight': path, 'momentum': path}), ...] sorted, checked to tile [0, max end)."""
    found = {}
    for path in glob.glob(os.path.join(folder, "centres_*_*.*.npy")):
        name = os.path.basename(path)
        _, lo, hi_kind = name.split("_", 2)
        hi, kind, _ = hi_kind.split(".")
        found.setdefault((int(lo), int(hi)), {})[kind] = path
    ranges = sorted(found)
    if not ranges:
        raise FileNotFoundError("no centre shard files (centres_*.npy) in %s" % folder)
    expected = 0
    for lo, hi in ranges:
        if lo != expected or set(found[(lo, hi)]) != {"weight", "momentum"}:
            raise ValueError("centre shards in %s do not tile the classes: gap or missing file at class %d"
                             % (folder, expected))
        expected = hi
    return [(r, found[r]) for r in ranges]
