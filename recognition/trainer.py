"""The training loop: a backbone (``backbone.py``), a training method (``method.py``), Horovod, verification and
checkpoints (``checkpointing.py``).

A training method owns the data and the classification head and runs one step (``method.TrainingMethod``; the
registry ``methods.py`` maps ``--method`` to one); the loop around it is the same for every method:

    Partial FC (``recognition.partial_fc.method``): batch -> backbone forward -> Partial FC head -> backward.
    FFC (``recognition.ffc.method``): id + instance batches -> EMA gallery net, probe forwards of both halves ->
    dynamic class queue (side A, undone; side B, kept) -> two backward passes -> one update.

The learning rate of everything comes from one schedule, a pure function of the global step. Everything the next
step depends on is a function of (seed, step) or is checkpointed (backbone parameters, optimizer momentum, the
method's state, the step), so a resumed run continues exactly where the interrupted one stood, on the same or a
different number of ranks.

A run starts from scratch, or fine-tunes: the backbone from a legacy export (``--pretrained``, loaded by the
Backbone before ``attach``) and the method's head from one of this project's checkpoint folders
(``--pretrained-head``, through ``method.load``); ``--resume`` then takes precedence over both. The method is
closed (its threads stopped, its files closed) when the run ends, fails or is stopped by a signal.
"""
import glob
import json
import logging
import math
import os
import signal
import time

import numpy as np
import mxnet as mx

from recognition import checkpoint_io, dist, startup_checks
from recognition.backbone import Backbone
from recognition.checkpointing import RunCheckpoints
from recognition.lr_scheduler import build_schedule
from recognition.method import Snapshot
from recognition.methods import method_class
from recognition.dist import on_every_rank
from recognition.pretrained import head_checkpoint
from recognition.progress import PhaseClock, ProgressLogger
from utils import fileio

log = logging.getLogger("recognition.train")

ZERO_LOSS_STEPS = 5     # a run whose loss is exactly 0 for its first steps is learning nothing: it stops
# what a run leaves in its output folder (a second run into the same folder without --resume is refused)
RUN_FILES = ("checkpoints", "train_log.jsonl", "model-symbol.json", "model-*.params", "best-*", "best.json")


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user must fix (bad data, a diverged loss); the same on every rank."""


def choose_context(name, local_rank):
    """The device of a rank: ``gpu`` is ``mx.gpu(local_rank)``, ``cpu`` the CPU, ``auto`` the GPU when MXNet sees
    one (``mx.context.num_gpus()``), else the CPU. Returns (context, why) for the log; a GPU the rank cannot have
    is a clear error, never a silent fall back to the CPU."""
    visible = mx.context.num_gpus()
    if name == "cpu":
        return mx.cpu(), "--ctx cpu"
    if name == "auto" and visible == 0:
        return mx.cpu(), "auto: MXNet sees no GPU"
    if visible == 0:
        raise ValueError("--ctx gpu, but MXNet sees no GPU (mx.context.num_gpus() is 0: a CPU-only mxnet build, "
                         "or no CUDA device visible)")
    if local_rank >= visible:
        raise ValueError("local rank %d has no GPU of its own: MXNet sees %d GPU(s) on this host; start at most "
                         "%d ranks per host (horovodrun -H host:%d)" % (local_rank, visible, visible, visible))
    return mx.gpu(local_rank), "%s: MXNet sees %d GPU(s), one per rank" % (name, visible)


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the ranks agree on at a step boundary (no rank dies mid-collective).
    ``restore()`` puts the previous handlers back."""

    def __init__(self):
        self.signum = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self):
        """Signal number if any rank was asked to stop (every rank gets the same answer), else 0."""
        return int(dist.allreduce(np.array([self.signum], np.int32), name="train.stop", op="max")[0])

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run of ``cfg`` (a frozen config) on this rank: ``fit()`` trains, checkpoints and closes."""

    def __init__(self, cfg, claim_output=True):
        self.cfg = cfg
        self.claim_output = claim_output      # False: a restart of this run in its own folder (--elastic)
        self.rank, self.size = dist.rank(), dist.size()
        self.ctx, why = on_every_rank(lambda: choose_context(cfg.ctx, dist.local_rank()), "choosing the device")
        if self.rank == 0:
            log.info("device: %s on rank 0 (%s)", self.ctx, why)
        self.method = self.verifier = None
        self.closed = False
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        cfg = self.cfg
        self.output = cfg.output
        startup_checks.check_shared_output(cfg.output)
        if self.claim_output:
            on_every_rank(self._claim_output, "the output folder")
        self.method = on_every_rank(lambda: method_class(cfg.method)(cfg, self.ctx, self.rank, self.size),
                                    "building the %s method (its data readers)" % cfg.method,
                                    cleanup=lambda method: method.close())
        self.steps_per_epoch = self.method.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError("the data gives no full batch of %d per rank on %d ranks" % (cfg.batch_size, self.size))
        epochs_steps = int(cfg.num_epochs * self.steps_per_epoch)
        self.total_steps = min(epochs_steps, cfg.max_steps) if cfg.max_steps else epochs_steps
        self.schedule = build_schedule(cfg, self.steps_per_epoch, self.size)
        self.backbone = Backbone(cfg, self.ctx, self.method.probe_batch_size, accumulate=self.method.accumulate)
        self.method.attach(self.backbone)
        if cfg.pretrained_head:       # the head's start; --resume later replaces it with the run's own
            folder = on_every_rank(lambda: head_checkpoint(cfg.pretrained_head, cfg), "head_folder")
            on_every_rank(lambda: self.method.load(folder), "head")
            if self.rank == 0:
                log.info("--pretrained-head: the %s head starts from %s", cfg.method, folder)
        self.checkpoints = RunCheckpoints(cfg, self.rank)
        self.checkpoint_root = self.checkpoints.root
        self.step = 0
        self.best = None
        self.verifier = None
        self.resumed = False
        self.loss_seen = False       # a non-zero loss so far
        # every .bin is read and checked now, not at the first verification (rank 0 verifies)
        self.val_sets = on_every_rank(self._load_val_sets, "verification sets")

    def _claim_output(self):
        """Rank 0: refuse an output folder that holds another run, unless --resume continues it or --overwrite
        replaces it (its checkpoints, exports and log are removed first)."""
        if self.rank != 0:
            return
        cfg = self.cfg
        if cfg.resume and cfg.overwrite:
            raise ValueError("--resume continues the run in %s and --overwrite deletes it: give one" % cfg.output)
        previous = sorted({os.path.basename(p) for pattern in RUN_FILES
                           for p in glob.glob(os.path.join(glob.escape(cfg.output), pattern))
                           if not os.path.isdir(p) or os.listdir(p)})
        if not previous or cfg.resume:
            return
        if not cfg.overwrite:
            raise ValueError("%s holds another run (%s): pass --resume to continue it, --overwrite to replace it, "
                             "or another --output" % (cfg.output, ", ".join(previous)))
        log.warning("--overwrite: removing the earlier run's %s from %s", ", ".join(previous), cfg.output)
        for name in previous:
            path = os.path.join(cfg.output, name)
            (checkpoint_io.remove_dir if os.path.isdir(path) else os.remove)(path)

    def _load_val_sets(self):
        """Rank 0: {name: (images, issame)} of the configured .bin sets; a missing one is skipped with a warning,
        a damaged one is an error now (before any training)."""
        if self.rank != 0 or not self.cfg.val_targets:
            return {}
        from eval import verification
        sets = {}
        for name in self.cfg.val_targets:
            path = os.path.join(self.cfg.val_dir or self.cfg.data_dir or "", name + ".bin")
            if not os.path.exists(path):
                log.warning("verification set %s not found; skipped", path)
                continue
            sets[name] = verification.load_bin(path)
        return sets

    @property
    def module(self):
        """The backbone's ``mx.mod.Module`` (what is exported and verified)."""
        return self.backbone.module

    @property
    def symbol(self):
        return self.backbone.symbol

    # ------------------------------------------------------------------------------------------- loop
    def fit(self, after_step=None):
        """Train to ``total_steps``; returns the last loss. Exits (non-zero) on SIGTERM / SIGINT after a
        checkpoint, which every rank agrees on at a step boundary. ``after_step(trainer)`` runs after every step,
        after its checkpoint (--elastic commits there). The method is closed however this ends."""
        try:
            return self._fit(after_step)
        finally:
            self.close()

    def _fit(self, after_step=None):
        cfg = self.cfg
        if cfg.resume and not self.resumed:
            self.resume()
        self.start_step = self.step
        progress = ProgressLogger(self.total_steps, cfg.batch_size * self.size, frequent=cfg.frequent,
                                  log_path=os.path.join(self.output, "train_log.jsonl") if self.rank == 0 else None,
                                  rank=self.rank, start_step=self.step)
        if self.rank == 0:
            log.info("training %s on %d rank(s): %d steps (%d per epoch), global batch %d; %s", cfg.network,
                     self.size, self.total_steps, self.steps_per_epoch, cfg.batch_size * self.size,
                     self.method.describe())
        stopper = StopRequest()
        try:
            loss = float("nan")
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                batches = self.method.batches(epoch, start_step=in_epoch)
                try:
                    for batch in batches:
                        loss = self.train_step(batch)
                        self.step += 1
                        self._check_loss(loss)
                        progress.step(self.step, epoch, loss, self.schedule(self.step - 1))
                        signum = stopper.agreed()
                        if signum:
                            self.save_checkpoint()
                            log.warning("rank %d: stopping at step %d on signal %d (checkpoint saved)",
                                        self.rank, self.step, signum)
                            raise SystemExit(128 + signum)
                        if cfg.verbose and self.step % cfg.verbose == 0:
                            self.verify(progress)
                        if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                            self.save_checkpoint()
                        if after_step is not None:
                            after_step(self)
                        if self.step >= self.total_steps:
                            break
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:      # a generator stopped early releases its reader resources now
                        close()
            if cfg.verbose and self.step % cfg.verbose != 0:
                self.verify(progress)
            return loss
        finally:
            stopper.restore()

    def _check_loss(self, loss):
        """Stop (every rank alike: the loss is global) on a loss that is not finite, and on one that stayed
        exactly 0 for the first steps (every row ignored: no usable data), before any checkpoint is written."""
        if not math.isfinite(loss):
            raise TrainingError("step %d: the loss is %r; stopping before it is saved (a learning rate too high for "
                                "this batch size, or broken data?)" % (self.step, loss))
        self.loss_seen = self.loss_seen or loss != 0.0
        first = self.step - self.start_step
        if not self.loss_seen and (first >= ZERO_LOSS_STEPS or self.step % self.cfg.checkpoint_every == 0
                                   or self.step == self.total_steps):
            raise TrainingError("the loss has been exactly 0 for the first %d step(s): no batch held a usable "
                                "labelled image (damaged or undecodable data?); nothing was saved" % first)

    def train_step(self, batch, phase_times=None):
        """One step of the method on ``batch``; returns the global mean loss.

        ``phase_times`` (a dict, for benchmarks): wait for MXNet's asynchronous engine at each phase boundary
        and add the seconds of each phase the method names (backbone forward, head, backbone backward with the
        Horovod allreduce and SGD, head update, ...). Without the waits, the head's first blocking read would
        absorb the backbone.
        """
        lr = self.schedule(self.step)
        # dropout masks (the only randomness in the graph) are a function of (seed, rank, step)
        mx.random.seed(_mix(self.cfg.seed, self.rank, self.step))
        return self.method.train_step(self.backbone, batch, lr, PhaseClock(phase_times, wait=True))

    def close(self):
        """Stop the method's threads and close its files (once; also after an error)."""
        if self.closed:
            return
        self.closed = True
        if self.method is not None:
            try:
                self.method.close()
            except Exception:     # noqa: BLE001 - closing after a failure must not hide the failure
                log.exception("rank %d: closing the training method failed", self.rank)
        if self.verifier is not None:
            close = getattr(self.verifier[0], "close", None)
            if close is not None:
                close()

    # ------------------------------------------------------------------------------------ verification
    def verify(self, progress):
        """Rank 0 evaluates the configured .bin sets; keeps the best legacy checkpoint."""
        if self.rank != 0 or not self.cfg.val_targets:
            return None
        from eval import verification
        from eval.embedding import Embedder
        if self.verifier is None:
            arg, aux = self.backbone.get_params()
            self.verifier = (Embedder(self.symbol, arg, aux, ctx=self.ctx, batch_size=self.cfg.val_batch_size),
                             self.val_sets)
        embedder, sets = self.verifier
        if not sets:
            return None
        arg, aux = self.backbone.get_params()
        embedder.set_params(arg, aux)
        results = verification.verify(embedder, sets)
        progress.log_eval(self.step, results)
        score = float(np.mean([r["accuracy"] for r in results.values()]))
        if self.best is None or score > self.best:
            self.best = score
            checkpoint_io.save_legacy_checkpoint(os.path.join(self.output, "best"), 0, self.symbol, arg, aux)
            fileio.atomic_write_bytes(os.path.join(self.output, "best.json"), json.dumps(
                {"step": self.step, "mean_accuracy": score, "results": results}, indent=1).encode())
        return results

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self):
        """A resumable state of this step (every rank contributes) plus its legacy export; returns the folder."""
        scaler = self.backbone.scaler
        state = {"step": self.step, "world_size": self.size, "method": self.cfg.method,
                 "num_classes": self.cfg.num_classes, "embedding_size": self.cfg.embedding_size,
                 "network": self.cfg.network, "seed": self.cfg.seed, "schedule": self.schedule.state_dict(),
                 "data_position": self.method.position(self.step), "best": self.best,
                 "loss_scale": scaler.state_dict() if scaler else None, "time": time.time()}
        return self.checkpoints.save(self.step, self.backbone, self.method, state)

    def snapshot(self):
        """The whole training state of this rank after ``step`` in host memory (an elastic commit,
        ``recognition/elastic.py``): a ``method.Snapshot`` whose shared part holds the step, the backbone, its
        optimizer state, the loss scale and the best verification besides the method's own. A collective: the
        BatchNorm moving statistics and the best verification differ between ranks and are rank 0's, as in a
        checkpoint (the live ones stay as they are)."""
        arg, aux = self.backbone.get_params()
        aux = {k: dist.broadcast(v, name="snapshot.aux." + k) for k, v in aux.items()}    # all sent, then read
        aux = {k: v.asnumpy() for k, v in aux.items()}
        best = float(dist.broadcast(np.array([np.nan if self.best is None else self.best]), "snapshot.best")[0])
        method = self.method.snapshot()
        scaler = self.backbone.scaler
        shared = {"step": self.step, "best": None if np.isnan(best) else best,
                  "position": self.method.position(self.step), "arg": {k: v.asnumpy() for k, v in arg.items()},
                  "aux": aux,
                  "optimizer": self.backbone.optimizer_states(), "loss_scale": scaler.state_dict() if scaler else None,
                  "method": method.shared}
        return Snapshot(shared, method.rows)

    def load_snapshot(self, shared, rows):
        """Continue from a ``snapshot()`` taken on any number of ranks; ``rows`` holds this rank's
        ``method.shard_rows()`` of it."""
        nd = lambda arrays: {k: mx.nd.array(v, dtype=v.dtype) for k, v in arrays.items()}
        self.backbone.set_params(nd(shared["arg"]), nd(shared["aux"]))
        self.backbone.load_optimizer_states(shared["optimizer"])
        self.method.load_snapshot(shared["method"], rows)
        if self.backbone.scaler is not None and shared["loss_scale"]:
            self.backbone.scaler.load_state_dict(shared["loss_scale"])
        self.step, self.best, self.resumed = int(shared["step"]), shared["best"], True

    def resume(self):
        """Load the newest complete checkpoint under the output folder, if any (re-sharding the centres)."""
        self.resumed = True
        folder = self.checkpoints.latest_intact()
        if folder is None:
            if self.rank == 0:
                log.info("--resume: no checkpoint under %s; starting from scratch", self.checkpoint_root)
            return False
        state = self.checkpoints.read_state(folder)
        for key in ("method", "num_classes", "embedding_size", "network"):
            if state[key] != self.cfg[key]:
                raise ValueError("checkpoint %s has %s=%r, this run %r" % (folder, key, state[key], self.cfg[key]))
        changed = self.schedule.mismatches(state["schedule"])
        if changed and self.rank == 0:
            log.warning("the LR schedule differs from the checkpoint's (%s)%s", "; ".join(changed),
                        " - expected: the world size changed" if state["world_size"] != self.size else "")
        self.checkpoints.load_backbone(folder, self.backbone)
        self.method.load(folder)
        self.step = int(state["step"])
        if self.backbone.scaler is not None and state.get("loss_scale"):
            self.backbone.scaler.load_state_dict(state["loss_scale"])
        self.best = state.get("best")
        if self.rank == 0:
            log.info("resumed from %s (step %d, written by %d rank(s), now %d)", folder, self.step,
                     state["world_size"], self.size)
        return True


def _mix(*values):
    """A 31-bit seed from integers (a SplitMix-style hash; stable across processes and runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return int(h & 0x7FFFFFFF)
