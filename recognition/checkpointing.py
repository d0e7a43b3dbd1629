"""A run's checkpoints: resumable states under ``<output>/checkpoints/step_*`` and legacy exports beside them.

A resumable state is a folder assembled under a staging name by every rank (the method writes its part, e.g.
each rank its centre shard; rank 0 the backbone, its optimizer state and ``state.json``) and renamed into place
once all have written, so a folder either is complete or does not count. Each one also gives a legacy export
``<output>/model-%04d.params`` (+ ``model-symbol.json``), of which the newest ``keep_exports`` are kept; the
newest ``keep_checkpoints`` states are kept.

Every state carries a manifest (each file's size and CRC-32, ``checkpoint_io``), computed by the ranks together
when it is written and checked by them together before it is loaded: ``--resume`` takes the newest state that is
intact, names the damaged ones it skips, and stops with one error when none is.
"""
import json
import logging
import os
import re

from recognition import checkpoint_io, dist
from utils import fileio

log = logging.getLogger("recognition.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
BACKBONE_FILE = "backbone.params"
OPTIMIZER_FILE = "optimizer.states"
EXPORT_PREFIX = "model"                             # legacy exports: model-symbol.json + model-%04d.params
_EXPORT_FILE = re.compile(r"^%s-(\d{4,})\.params$" % EXPORT_PREFIX)


class RunCheckpoints:
    """The checkpoints of the run writing into ``cfg.output``. Every method is called on every rank."""

    def __init__(self, cfg, rank):
        self.cfg, self.rank = cfg, rank
        self.output = cfg.output
        self.root = os.path.join(self.output, CHECKPOINT_DIR)
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)

    def save(self, step, backbone, method, state):
        """Write the state of ``step``: the method's part (every rank), the backbone, its optimizer and ``state``
        (a JSON-ready dict, rank 0), then make it visible at once and write the legacy export. Returns the
        folder."""
        final = os.path.join(self.root, "step_%09d" % step)
        tmp = checkpoint_io.staging_dir(final)
        if self.rank == 0:
            checkpoint_io.prepare_dir(final)
        dist.barrier("ckpt.begin")
        method.save(tmp)
        if self.rank == 0:
            checkpoint_io.save_params(os.path.join(tmp, BACKBONE_FILE), *backbone.get_params())
            fileio.atomic_write_bytes(os.path.join(tmp, OPTIMIZER_FILE), backbone.optimizer_states())
            fileio.atomic_write_bytes(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1).encode())
        dist.barrier("ckpt.written")
        manifest = self._shared_checksums(tmp)
        if self.rank == 0:
            checkpoint_io.commit_dir(tmp, final, manifest)
            # the export of checkpoint n (step n x checkpoint_every) is model-n; a last step between two
            # checkpoints gets the next number, not the previous export's (which it would overwrite)
            index = -(-step // self.cfg.checkpoint_every) if self.cfg.checkpoint_every else step
            arg, aux = backbone.get_params()
            checkpoint_io.save_legacy_checkpoint(os.path.join(self.output, EXPORT_PREFIX), index, backbone.symbol,
                                                 arg, aux)
            self._prune_states()
            self._prune_exports(index)
            log.info("checkpoint %s", final)
        dist.barrier("ckpt.done")
        return final

    def latest(self):
        """The newest complete state folder, or None (not checked against its manifest: see ``latest_intact``)."""
        return checkpoint_io.latest_complete(self.root, "step_*")

    def latest_intact(self):
        """The newest complete state folder whose files match its manifest (a collective: every rank checks a
        share of the files, all agree), or None when there is no state at all. Damaged newer states are named in
        a warning and skipped; when every state is damaged, ValueError lists what is wrong with each."""
        candidates = dist.allgather_object(checkpoint_io.complete_folders(self.root, "step_*"), "ckpt.list")[0]
        damaged = []
        for folder in candidates:
            try:
                manifest = checkpoint_io.read_manifest(folder)
                names = sorted(manifest) if manifest is not None else []
                mine = names[self.rank::dist.size()]
                problems = checkpoint_io.verify_files(folder, manifest, mine) if mine else []
            except (OSError, ValueError) as err:
                problems = [str(err)]
            problems = sorted({p for every in dist.allgather_object(problems, "ckpt.verify") for p in every})
            if not problems:
                if damaged and self.rank == 0:
                    log.warning("--resume: skipped damaged checkpoint(s) %s; resuming from %s",
                                ", ".join(f for f, _ in damaged), folder)
                return folder
            damaged.append((folder, problems))
            if self.rank == 0:
                log.warning("checkpoint %s is damaged and skipped: %s", folder, "; ".join(problems[:5]))
        if damaged:
            raise ValueError("--resume: no intact checkpoint under %s: %s" % (self.root, " | ".join(
                "%s: %s" % (os.path.basename(f), "; ".join(p[:3])) for f, p in damaged)))
        return None

    def _shared_checksums(self, folder):
        """The manifest of the staging ``folder``: each rank sums a share of its files (a collective)."""
        names = dist.allgather_object(checkpoint_io.folder_files(folder) if self.rank == 0 else None,
                                      "ckpt.files")[0]
        mine = checkpoint_io.checksums(folder, names[self.rank::dist.size()])
        manifest = {}
        for part in dist.allgather_object(mine, "ckpt.sums"):
            manifest.update(part)
        return manifest

    @staticmethod
    def read_state(folder):
        path = os.path.join(folder, STATE_FILE)
        try:
            with open(path) as f:
                state = json.load(f)
            state.setdefault("method", "pfc")        # checkpoints written before FFC existed
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError("%s cannot be read: %s" % (path, err)) from None
        return state

    @staticmethod
    def load_backbone(folder, backbone):
        """The backbone's parameters and optimizer state from ``folder``."""
        backbone.set_params(*checkpoint_io.load_params(os.path.join(folder, BACKBONE_FILE)))
        with open(os.path.join(folder, OPTIMIZER_FILE), "rb") as f:
            backbone.load_optimizer_states(f.read())

    def _prune_states(self):
        keep = self.cfg.keep_checkpoints
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and
                      os.path.isfile(os.path.join(self.root, d, checkpoint_io.COMPLETE)))
        for old in done[:-keep] if keep else []:
            checkpoint_io.remove_dir(os.path.join(self.root, old))

    def _prune_exports(self, current):
        """Keep the newest ``keep_exports`` legacy ``model-%04d.params`` (0: all), always the one just written.
        The best-verifying weights are ``best-0000.params``, another prefix, never removed here."""
        keep = self.cfg.keep_exports
        if not keep:
            return
        found = sorted((int(m.group(1)), m.group(0)) for m in map(_EXPORT_FILE.match, os.listdir(self.output)) if m)
        older = [name for index, name in found if index != current]
        for name in older[:max(0, len(found) - keep)]:
            os.remove(os.path.join(self.output, name))
