"""The training loop: backbone symbol in an ``mx.mod.Module``, a head (Partial FC), Horovod, checkpoints.

One step on every rank:
    batch (this rank's shard) -> backbone forward -> head.forward_backward (gathers the global batch, margin
    softmax over the sampled centres) -> backbone backward with the head's embedding gradient -> backbone
    update (gradients summed over ranks by Horovod's DistributedOptimizer) -> head.update (memory bank SGD).
The learning rate of both comes from one schedule, a pure function of the global step.

Everything the next step depends on is a function of (seed, step) or is checkpointed (backbone parameters,
optimizer momentum, every rank's centre shard and momentum, the step), so a resumed run continues exactly where
the interrupted one stood, on the same or a different number of ranks.
"""
import json
import logging
import os
import signal
import time
import warnings

import numpy as np
import mxnet as mx

from recognition import checkpoint_io, dist
from recognition.data import build_reader
from recognition.partial_fc import PartialFCHead
from recognition.loss_scale import DynamicLossScaler
from recognition.lr_scheduler import build_schedule
from recognition.partial_fc import IGNORE_LABEL
from recognition.progress import ProgressLogger

log = logging.getLogger("recognition.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"


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
        self.ctx = mx.gpu(dist.local_rank()) if cfg.ctx == "gpu" else mx.cpu()
        self.reader = build_reader(cfg, self.rank, self.size)
        self.steps_per_epoch = self.reader.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError("the data gives no full batch of %d per rank on %d ranks" % (cfg.batch_size, self.size))
        epochs_steps = int(cfg.num_epochs * self.steps_per_epoch)
        self.total_steps = min(epochs_steps, cfg.max_steps) if cfg.max_steps else epochs_steps
        self.schedule = build_schedule(cfg, self.steps_per_epoch, self.size)
        self.module, self.symbol = self._build_backbone()
        self.head = PartialFCHead(cfg, self.ctx)
        self.output = cfg.output
        self.checkpoint_root = os.path.join(self.output, CHECKPOINT_DIR)
        self.step = 0
        self.best = None
        self.verifier = None
        if self.rank == 0:
            os.makedirs(self.checkpoint_root, exist_ok=True)

    # ------------------------------------------------------------------------------------------ set-up
    def _build_backbone(self):
        import symbols
        cfg = self.cfg
        symbol = symbols.get_symbol(cfg.network, embedding_size=cfg.embedding_size, fp16=cfg.fp16,
                                    dropout=cfg.dropout, act_type=cfg.act_type)
        module = mx.mod.Module(symbol, data_names=["data"], label_names=None, context=self.ctx)
        module.bind(data_shapes=[("data", (cfg.batch_size, 3, 112, 112))], for_training=True)
        mx.random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        module.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
        if self.size > 1:   # identical start everywhere, whatever each rank's initialiser did
            import horovod.mxnet as hvd
            arg, aux = module.get_params()
            hvd.broadcast_parameters(arg, root_rank=0, prefix="arg.")
            hvd.broadcast_parameters(aux, root_rank=0, prefix="aux.")
            module.set_params(arg, aux)
        # The head's embedding gradient is d(mean loss over the GLOBAL batch)/d(local embeddings), so the
        # backbone gradient is the SUM of the ranks' gradients; Horovod averages, hence rescale_grad = size.
        opt = mx.optimizer.SGD(learning_rate=cfg.lr, momentum=cfg.momentum, wd=cfg.weight_decay,
                               rescale_grad=float(self.size), multi_precision=bool(cfg.fp16))
        self._sgd = opt                  # the loss scale is divided out through its rescale_grad
        if self.size > 1:
            import horovod.mxnet as hvd
            opt = hvd.DistributedOptimizer(opt)
        self._rescale_grad = self._sgd.rescale_grad      # read after Horovod, which may adjust it
        use_scaler = cfg.loss_scale == "dynamic" or (cfg.loss_scale == "auto" and cfg.fp16)
        self.scaler = DynamicLossScaler() if use_scaler else None
        with warnings.catch_warnings():   # MXNet expects rescale_grad = 1/batch; ours is deliberate (above)
            warnings.filterwarnings("ignore", message="Optimizer created manually")
            module.init_optimizer(kvstore=None, optimizer=opt)
        return module, symbol

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
            log.info("training %s on %d rank(s): %d steps (%d per epoch), global batch %d, %d classes, "
                     "sample_ratio %g", cfg.network, self.size, self.total_steps, self.steps_per_epoch,
                     cfg.batch_size * self.size, cfg.num_classes, cfg.sample_ratio)
        loss = float("nan")
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            for batch in self.reader.epoch(epoch, start_step=in_epoch):
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
        """One step on the current batch; returns the global mean loss.

        ``phase_times`` (a dict, for benchmarks): wait for MXNet's asynchronous engine at each phase boundary
        and add the seconds of backbone_forward, head, backbone_backward (with the Horovod allreduce and SGD)
        and head_update to it. Without the waits, the head's first blocking read would absorb the backbone.
        """
        clock = _PhaseClock(phase_times)
        lr = self.schedule(self.step)
        # dropout masks (the only randomness in the graph) are a function of (seed, rank, step)
        mx.random.seed(_mix(self.cfg.seed, self.rank, self.step))
        self.module._optimizer.set_learning_rate(lr)
        self.module.forward(mx.io.DataBatch(data=[batch.data]), is_train=True)
        embeddings = self.module.get_outputs()[0]
        clock.tick("backbone_forward", embeddings)
        labels = batch.label
        if batch.pad:                    # padding rows (the epoch's end) are left out of the loss
            labels = labels.copy()
            labels[labels.size - batch.pad:] = IGNORE_LABEL
        loss, grad = self.head.forward_backward(embeddings, labels)
        clock.tick("head", grad)
        if self.scaler is None:
            self.module.backward(out_grads=[grad])
            self.module.update()
        else:
            scale = self.scaler.scale
            self.module.backward(out_grads=[grad * scale])
            grads = [g for per_device in self.module._exec_group.grad_arrays for g in per_device]
            if not self.scaler.update(self.scaler.gradients_overflowed(grads)):
                self._sgd.rescale_grad = self._rescale_grad / scale
                self.module.update()
            else:
                log.warning("rank %d: step %d: float16 gradient overflow, backbone update skipped, loss scale "
                            "now %g", self.rank, self.step + 1, self.scaler.scale)
        clock.tick("backbone_backward", None)
        self.head.update(lr)
        clock.tick("head_update", None)
        return loss

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
            arg, aux = self.module.get_params()
            self.verifier = (verification.Embedder(self.symbol, arg, aux, ctx=self.ctx,
                                                   batch_size=self.cfg.val_batch_size), sets)
        embedder, sets = self.verifier
        if not sets:
            return None
        arg, aux = self.module.get_params()
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
        self.head.save(tmp)
        if self.rank == 0:
            arg, aux = self.module.get_params()
            checkpoint_io.atomic_save_ndarrays(os.path.join(tmp, "backbone.params"),
                                               {**{"arg:" + k: v for k, v in arg.items()},
                                                **{"aux:" + k: v for k, v in aux.items()}})
            checkpoint_io.atomic_write_bytes(os.path.join(tmp, "optimizer.states"),
                                             self.module._updater.get_states(dump_optimizer=False))
            state = {"step": self.step, "world_size": self.size, "num_classes": self.cfg.num_classes,
                     "embedding_size": self.cfg.embedding_size, "network": self.cfg.network,
                     "seed": self.cfg.seed, "schedule": self.schedule.state_dict(), "best": self.best,
                     "loss_scale": self.scaler.state_dict() if self.scaler else None,
                     "time": time.time()}
            checkpoint_io.atomic_write_bytes(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1).encode())
        dist.barrier("ckpt.written")
        if self.rank == 0:
            checkpoint_io.commit_dir(tmp, final)
            arg, aux = self.module.get_params()
            index = self.step // self.cfg.checkpoint_every if self.cfg.checkpoint_every else self.step
            checkpoint_io.save_legacy_checkpoint(os.path.join(self.output, "model"), index, self.symbol, arg, aux)
            self._prune_checkpoints()
            log.info("checkpoint %s", final)
        dist.barrier("ckpt.done")
        return final

    def _prune_checkpoints(self):
        keep = self.cfg.keep_checkpoints
        done = sorted(d for d in os.listdir(self.checkpoint_root) if d.startswith("step_") and
                      os.path.isfile(os.path.join(self.checkpoint_root, d, checkpoint_io.COMPLETE)))
        for old in done[:-keep] if keep else []:
            checkpoint_io.remove_dir(os.path.join(self.checkpoint_root, old))

    def resume(self):
        """Load the newest complete checkpoint under the output folder, if any (re-sharding the centres)."""
        folder = checkpoint_io.latest_complete(self.checkpoint_root, "step_*")
        if folder is None:
            if self.rank == 0:
                log.info("--resume: no checkpoint under %s; starting from scratch", self.checkpoint_root)
            return False
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        for key in ("num_classes", "embedding_size", "network"):
            if state[key] != self.cfg[key]:
                raise ValueError("checkpoint %s has %s=%r, this run %r" % (folder, key, state[key], self.cfg[key]))
        changed = self.schedule.mismatches(state["schedule"])
        if changed and self.rank == 0:
            log.warning("the LR schedule differs from the checkpoint's (%s)%s", "; ".join(changed),
                        " - expected: the world size changed" if state["world_size"] != self.size else "")
        saved = mx.nd.load(os.path.join(folder, "backbone.params"))
        arg = {k[4:]: v for k, v in saved.items() if k.startswith("arg:")}
        aux = {k[4:]: v for k, v in saved.items() if k.startswith("aux:")}
        self.module.set_params(arg, aux)
        with open(os.path.join(folder, "optimizer.states"), "rb") as f:
            self.module._updater.set_states(f.read())
        self.head.load(folder)
        self.step = int(state["step"])
        if self.scaler is not None and state.get("loss_scale"):
            self.scaler.load_state_dict(state["loss_scale"])
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
