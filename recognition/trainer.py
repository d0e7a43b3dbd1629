"""The training loop: a backbone (``backbone.py``), a training method, Horovod, verification and checkpoints.

A training method owns the data and the classification head and runs one step; the loop around it is the same
for every method:

    Partial FC (``recognition.partial_fc.method``): batch -> backbone forward -> Partial FC head -> backward.
    FFC (``recognition.ffc.method``): id + instance batches -> EMA gallery net, probe forwards of both halves ->
    dynamic class queue (side A, undone; side B, kept) -> two backward passes -> one update.

A method provides ``steps_per_epoch``, ``probe_batch_size`` (rows of one backbone forward), ``accumulate`` (True
when a step runs several backward passes), ``attach(backbone)``, ``batches(epoch, start_step)``,
``train_step(backbone, batch, lr, clock) -> loss``, ``position(step)`` (its data position, for the checkpoint),
``save(folder)`` / ``load(folder)`` (every rank) and ``timings``. The learning rate of everything comes from one
schedule, a pure function of the global step.

Everything the next step depends on is a function of (seed, step) or is checkpointed (backbone parameters,
optimizer momentum, the method's state, the step), so a resumed run continues exactly where the interrupted one
stood, on the same or a different number of ranks.

A run starts from scratch, or fine-tunes: the backbone from a legacy export (``--pretrained``, loaded by the
Backbone before ``attach``) and the method's head from one of this project's checkpoint folders
(``--pretrained-head``, through ``method.load``); ``--resume`` then takes precedence over both. Each checkpoint
also writes a legacy export ``model-%04d.params``; the newest ``keep_exports`` are kept.
"""
import json
import logging
import os
import re
import signal
import time

import numpy as np
import mxnet as mx

from recognition import checkpoint_io, dist, startup_checks
from recognition.backbone import Backbone
from recognition.lr_scheduler import build_schedule
from recognition.pretrained import head_checkpoint, on_every_rank
from recognition.progress import ProgressLogger

log = logging.getLogger("recognition.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
EXPORT_PREFIX = "model"                             # legacy exports: model-symbol.json + model-%04d.params
_EXPORT_FILE = re.compile(r"^%s-(\d{4,})\.params$" % EXPORT_PREFIX)


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


def build_method(cfg, ctx, rank, size):
    """The training method ``cfg.method`` names ("pfc" or "ffc")."""
    if cfg.method == "ffc":
        from recognition.ffc.method import FFCMethod
        return FFCMethod(cfg, ctx, rank, size)
    from recognition.partial_fc.method import PartialFCMethod
    return PartialFCMethod(cfg, ctx, rank, size)


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the ranks agree on at a step boundary (no rank dies mid-collective)."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self):
        """Signal number if any rank was asked to stop (every rank gets the same answer), else 0."""
        return int(dist.allreduce(np.array([self.signum], np.int32), name="train.stop", op="max")[0])


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.size = dist.rank(), dist.size()
        self.ctx, why = choose_context(cfg.ctx, dist.local_rank())
        if self.rank == 0:
            log.info("device: %s on rank 0 (%s)", self.ctx, why)
        self.method = startup_checks.start(cfg, lambda: build_method(cfg, self.ctx, self.rank, self.size))
        self.steps_per_epoch = self.method.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError("the data gives no full batch of %d per rank on %d ranks" % (cfg.batch_size, self.size))
        epochs_steps = int(cfg.num_epochs * self.steps_per_epoch)
        self.total_steps = min(epochs_steps, cfg.max_steps) if cfg.max_steps else epochs_steps
        self.schedule = build_schedule(cfg, self.steps_per_epoch, self.size)
        self.backbone = Backbone(cfg, self.ctx, self.method.probe_batch_size, accumulate=self.method.accumulate)
        self.method.attach(self.backbone)
        if cfg.get("pretrained_head"):       # the head's start; --resume later replaces it with the run's own
            folder = on_every_rank(lambda: head_checkpoint(cfg.pretrained_head, cfg), "head_folder")
            on_every_rank(lambda: self.method.load(folder), "head")
            if self.rank == 0:
                log.info("--pretrained-head: the %s head starts from %s", cfg.method, folder)
        self.output = cfg.output
        self.checkpoint_root = os.path.join(self.output, CHECKPOINT_DIR)
        self.step = 0
        self.best = None
        self.verifier = None
        if self.rank == 0:
            os.makedirs(self.checkpoint_root, exist_ok=True)

    @property
    def module(self):
        """The backbone's ``mx.mod.Module`` (what is exported and verified)."""
        return self.backbone.module

    @property
    def symbol(self):
        return self.backbone.symbol

    # ------------------------------------------------------------------------------------------- loop
    def fit(self):
        """Train to ``total_steps``; returns the last loss. Exits (non-zero) on SIGTERM / SIGINT after a
        checkpoint, which every rank agrees on at a step boundary."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        stopper = StopRequest()
        progress = ProgressLogger(self.total_steps, cfg.batch_size * self.size, frequent=cfg.frequent,
                                  log_path=os.path.join(self.output, "train_log.jsonl") if self.rank == 0 else None,
                                  rank=self.rank, start_step=self.step)
        if self.rank == 0:
            log.info("training %s on %d rank(s): %d steps (%d per epoch), global batch %d; %s", cfg.network,
                     self.size, self.total_steps, self.steps_per_epoch, cfg.batch_size * self.size,
                     self.method.describe())
        loss = float("nan")
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            for batch in self.method.batches(epoch, start_step=in_epoch):
                loss = self.train_step(batch)
                self.step += 1
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
                if self.step >= self.total_steps:
                    break
        if cfg.verbose and self.step % cfg.verbose != 0:
            self.verify(progress)
        return loss

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
        return self.method.train_step(self.backbone, batch, lr, _PhaseClock(phase_times))

    # ------------------------------------------------------------------------------------ verification
    def verify(self, progress):
        """Rank 0 evaluates the configured .bin sets; keeps the best legacy checkpoint."""
        if self.rank != 0 or not self.cfg.val_targets:
            return None
        from eval import verification
        if self.verifier is None:
            sets = {}
            for name in self.cfg.val_targets:
                path = os.path.join(self.cfg.val_dir or self.cfg.data_dir or "", name + ".bin")
                if not os.path.exists(path):
                    log.warning("verification set %s not found; skipped", path)
                    continue
                sets[name] = verification.load_bin(path)
            arg, aux = self.backbone.get_params()
            self.verifier = (verification.Embedder(self.symbol, arg, aux, ctx=self.ctx,
                                                   batch_size=self.cfg.val_batch_size), sets)
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
            checkpoint_io.atomic_write_bytes(os.path.join(self.output, "best.json"), json.dumps(
                {"step": self.step, "mean_accuracy": score, "results": results}, indent=1).encode())
        return results

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self):
        """Legacy export (rank 0) plus a resumable state that every rank contributes to, made visible atomically."""
        final = os.path.join(self.checkpoint_root, "step_%09d" % self.step)
        tmp = checkpoint_io.staging_dir(final)
        if self.rank == 0:
            checkpoint_io.prepare_dir(final)
        dist.barrier("ckpt.begin")
        self.method.save(tmp)
        if self.rank == 0:
            arg, aux = self.backbone.get_params()
            checkpoint_io.atomic_save_ndarrays(os.path.join(tmp, "backbone.params"),
                                               {**{"arg:" + k: v for k, v in arg.items()},
                                                **{"aux:" + k: v for k, v in aux.items()}})
            checkpoint_io.atomic_write_bytes(os.path.join(tmp, "optimizer.states"), self.backbone.optimizer_states())
            scaler = self.backbone.scaler
            state = {"step": self.step, "world_size": self.size, "method": self.cfg.method,
                     "num_classes": self.cfg.num_classes, "embedding_size": self.cfg.embedding_size,
                     "network": self.cfg.network, "seed": self.cfg.seed, "schedule": self.schedule.state_dict(),
                     "data_position": self.method.position(self.step), "best": self.best,
                     "loss_scale": scaler.state_dict() if scaler else None, "time": time.time()}
            checkpoint_io.atomic_write_bytes(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1).encode())
        dist.barrier("ckpt.written")
        if self.rank == 0:
            checkpoint_io.commit_dir(tmp, final)
            arg, aux = self.backbone.get_params()
            index = self.step // self.cfg.checkpoint_every if self.cfg.checkpoint_every else self.step
            checkpoint_io.save_legacy_checkpoint(os.path.join(self.output, EXPORT_PREFIX), index, self.symbol, arg,
                                                 aux)
            self._prune_checkpoints()
            self._prune_exports(index)
            log.info("checkpoint %s", final)
        dist.barrier("ckpt.done")
        return final

    def _prune_checkpoints(self):
        keep = self.cfg.keep_checkpoints
        done = sorted(d for d in os.listdir(self.checkpoint_root) if d.startswith("step_") and
                      os.path.isfile(os.path.join(self.checkpoint_root, d, checkpoint_io.COMPLETE)))
        for old in done[:-keep] if keep else []:
            checkpoint_io.remove_dir(os.path.join(self.checkpoint_root, old))

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

    def resume(self):
        """Load the newest complete checkpoint under the output folder, if any (re-sharding the centres)."""
        folder = checkpoint_io.latest_complete(self.checkpoint_root, "step_*")
        if folder is None:
            if self.rank == 0:
                log.info("--resume: no checkpoint under %s; starting from scratch", self.checkpoint_root)
            return False
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        state.setdefault("method", "pfc")        # checkpoints written before FFC existed
        for key in ("method", "num_classes", "embedding_size", "network"):
            if state[key] != self.cfg[key]:
                raise ValueError("checkpoint %s has %s=%r, this run %r" % (folder, key, state[key], self.cfg[key]))
        changed = self.schedule.mismatches(state["schedule"])
        if changed and self.rank == 0:
            log.warning("the LR schedule differs from the checkpoint's (%s)%s", "; ".join(changed),
                        " - expected: the world size changed" if state["world_size"] != self.size else "")
        saved = mx.nd.load(os.path.join(folder, "backbone.params"))
        arg = {k[4:]: v for k, v in saved.items() if k.startswith("arg:")}
        aux = {k[4:]: v for k, v in saved.items() if k.startswith("aux:")}
        self.backbone.set_params(arg, aux)
        with open(os.path.join(folder, "optimizer.states"), "rb") as f:
            self.backbone.load_optimizer_states(f.read())
        self.method.load(folder)
        self.step = int(state["step"])
        if self.backbone.scaler is not None and state.get("loss_scale"):
            self.backbone.scaler.load_state_dict(state["loss_scale"])
        self.best = state.get("best")
        if self.rank == 0:
            log.info("resumed from %s (step %d, written by %d rank(s), now %d)", folder, self.step,
                     state["world_size"], self.size)
        return True


class _PhaseClock:
    """Adds wall time per phase to a dict after waiting for the phase's result; does nothing without a dict."""

    def __init__(self, totals):
        self.totals, self.last = totals, time.perf_counter()

    def tick(self, phase, result):
        if self.totals is None:
            return
        if result is None:
            mx.nd.waitall()
        else:
            result.wait_to_read()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


def _mix(*values):
    """A 31-bit seed from integers (a SplitMix-style hash; stable across processes and runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return int(h & 0x7FFFFFFF)
