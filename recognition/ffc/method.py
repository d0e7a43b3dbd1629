"""FFC as a training method (``docs/ffc.md``, "One training step"): two loaders, the probe backbone, an EMA
gallery net and the dynamic class queue.

Each step, on every rank: the id loader gives B identities with two images each (a, b) and the instance loader B
images, split into halves c and d. The probe-side batch is x = [a; c], the gallery-side batch y = [b; d] (1.5 B
rows each). Then:
    1. the gallery net moves towards the probe (EMA);
    2. side A: gallery(y) is inserted, probe(x) is scored, and the queue drops side A's changes (keep=False);
       the probe's gradient of x goes back through the backbone;
    3. side B: gallery(x) is inserted and kept, probe(y) is scored; its gradient goes back too, adding up with A's
       (the backbone is bound with grad_req='add');
    4. one backbone update with the sum. The queue returns d(loss)/d(probe) of the loss averaged over ranks, so
       the ranks' backbone gradients SUM to the gradient of that loss: the convention of ``recognition.backbone``
       (Horovod averages, rescale_grad = world size) holds as it does for Partial FC.
The loss logged is A + B. Both loaders' positions are pure functions of the global step (the instance loader's
epoch and step, the id loader's pass and step), so a checkpoint needs only the step; it also holds the gallery's
parameters and the queue's state, which are identical on every rank and written by rank 0.
"""
import json
import logging
import os
import zlib
from typing import NamedTuple

import numpy as np
import mxnet as mx

from recognition import checkpoint_io, dist
from recognition.config_checks import check_choice, check_range
from recognition.data.build import build_reader
from recognition.data.id_loader import build_id_loader
from recognition.ffc.class_queue import DynamicClassQueue
from recognition.ffc.gallery import GalleryNet, live_param_arrays
from recognition.ffc.queue_loss import LOSS_TYPES
from recognition.method import Snapshot, TrainingMethod
from utils import fileio

log = logging.getLogger("recognition.train")

GALLERY_FILE = "gallery.params"
QUEUE_FILE = "queue.npz"


class FFCBatch(NamedTuple):
    x: mx.nd.NDArray          # (1.5 B, 3, H, W) probe side first: [a; c]
    y: mx.nd.NDArray          # (1.5 B, 3, H, W): [b; d]
    x_label: np.ndarray       # (1.5 B,) int64
    y_label: np.ndarray


def pair_batches(id_batch, instance_batch):
    """The two sides of an FFC step from an id batch (a, b, ids) and an instance batch split in halves c, d."""
    data = instance_batch.data.asnumpy()
    half = len(data) // 2
    a, b = id_batch.a.asnumpy(), id_batch.b.asnumpy()
    x = np.concatenate([a, data[:half]])
    y = np.concatenate([b, data[half:]])
    ids, labels = np.asarray(id_batch.label, np.int64), np.asarray(instance_batch.label, np.int64)
    return FFCBatch(mx.nd.from_numpy(x, zero_copy=True), mx.nd.from_numpy(y, zero_copy=True),
                    np.concatenate([ids, labels[:half]]), np.concatenate([ids, labels[half:]]))


class FFCMethod(TrainingMethod):
    """The trainer's interface to FFC (see ``recognition.method.TrainingMethod``)."""

    name = "ffc"
    accumulate = True           # sides A and B each run a backward pass; one update per step

    @classmethod
    def config_defaults(cls):
        return {
            "queue_size": 7409,         # Q, slots of the dynamic class queue (the reference's default)
            "ffc_alpha": 0.99,          # gallery net EMA: g <- alpha * g + (1 - alpha) * probe, every step
            "ffc_loss": "arcface",      # arcface (cos(theta + m)) | cosface (cos - m) | sv (SV-softmax)
            "ffc_margin": 0.5,          # m of ffc_loss
            "ffc_sv_t": 1.2,            # t of SV-softmax's hard negatives t * cos + t - 1
        }

    @classmethod
    def add_arguments(cls, parser):
        add = parser.add_argument
        add("--queue-size", type=int, help="slots of the dynamic class queue")
        add("--ffc-alpha", type=float, help="EMA rate of the gallery net (g <- a*g + (1-a)*probe)")
        add("--ffc-loss", choices=LOSS_TYPES, help="margin type over the queue")
        add("--margin", type=float, dest="ffc_margin", help="margin m of --ffc-loss (Partial FC takes --margins)")

    @classmethod
    def finalize_config(cls, cfg):
        check_choice(cfg, "ffc_loss", LOSS_TYPES)
        check_range(cfg, "queue_size", 1)
        check_range(cfg, "ffc_alpha", 0.0, 1.0)
        check_range(cfg, "ffc_margin", 0.0)
        check_range(cfg, "ffc_sv_t", 1.0)
        if cfg.batch_size % 2:
            raise ValueError("FFC splits each instance batch into two halves: batch_size must be even, got %d"
                             % cfg.batch_size)

    @classmethod
    def output_name(cls, cfg):
        return "ffc_" + cfg.ffc_loss

    def __init__(self, cfg, ctx, rank, size):
        self.cfg, self.ctx, self.rank = cfg, ctx, rank
        self.instances = build_reader(cfg, rank, size)
        self.ids = None
        try:
            self.ids = build_id_loader(cfg, rank, size)
            self.queue = DynamicClassQueue(cfg.queue_size, cfg.embedding_size, loss=cfg.ffc_loss,
                                           margin=cfg.ffc_margin, scale=cfg.scale, sv_t=cfg.ffc_sv_t, seed=cfg.seed)
        except BaseException:
            self.close()
            raise
        self.alpha = float(cfg.ffc_alpha)
        self.gallery = None
        self.probe_arrays = None

    @property
    def steps_per_epoch(self):
        return self.instances.steps_per_epoch

    @property
    def probe_batch_size(self):
        return self.cfg.batch_size + self.cfg.batch_size // 2

    def describe(self):
        return ("FFC: queue of %d slots for %d identities, %s margin %g scale %g, gallery EMA alpha %g, id loader "
                "%d steps a pass" % (self.cfg.queue_size, self.ids.num_identities, self.cfg.ffc_loss,
                                     self.cfg.ffc_margin, self.cfg.scale, self.alpha, self.ids.steps_per_pass))

    def attach(self, backbone):
        """Build the gallery net equal to the probe (after the probe's parameters are final on every rank)."""
        arg, aux = backbone.get_params()
        self.gallery = GalleryNet(backbone.symbol, self.ctx, self.probe_batch_size, arg, aux)
        self.probe_arrays = live_param_arrays(backbone.module)

    # ------------------------------------------------------------------------------------------ data
    def id_position(self, step):
        """(pass, step in pass) of the id loader at global step ``step``."""
        return divmod(step, self.ids.steps_per_pass)

    def batches(self, epoch, start_step=0):
        """FFCBatches of steps start_step .. of ``epoch`` (the instance loader's epoch); the id loader continues
        across its own passes from the same global step."""
        id_pass, id_step = self.id_position(epoch * self.steps_per_epoch + start_step)
        id_stream = self._id_stream(id_pass, id_step)
        try:
            for instance_batch in self.instances.epoch(epoch, start_step=start_step):
                yield pair_batches(next(id_stream), instance_batch)
        finally:
            id_stream.close()

    def _id_stream(self, id_pass, id_step):
        while True:
            yield from self.ids.batches(id_pass, start_step=id_step)
            id_pass, id_step = id_pass + 1, 0

    def position(self, step):
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        id_pass, id_step = self.id_position(step)
        return {"epoch": epoch, "step_in_epoch": in_epoch, "id_pass": id_pass, "id_step": id_step}

    # ------------------------------------------------------------------------------------------ a step
    def train_step(self, backbone, batch, lr, clock):
        self.gallery.follow(self.probe_arrays, self.alpha)
        clock.tick("gallery_ema", None)
        loss = 0.0
        for probe_data, probe_labels, gallery_data, gallery_labels, keep in (
                (batch.x, batch.x_label, batch.y, batch.y_label, False),      # side A: undone
                (batch.y, batch.y_label, batch.x, batch.x_label, True)):      # side B: kept
            gallery_features = self.gallery.embed(gallery_data)
            clock.tick("gallery_forward", gallery_features)
            probe_features = backbone.forward(probe_data)
            clock.tick("backbone_forward", probe_features)
            side_loss, grad = self.queue.forward_backward(probe_features, probe_labels, gallery_features,
                                                          gallery_labels, keep=keep)
            clock.tick("head", grad)
            backbone.backward(grad)
            clock.tick("backbone_backward", None)
            loss += side_loss
        backbone.update(lr)
        clock.tick("backbone_update", None)
        return loss

    # ------------------------------------------------------------------------------------- checkpoints
    def save(self, folder):
        """Rank 0 writes the gallery's parameters and the queue (identical on every rank: checked first)."""
        state = self.queue.state_dict()
        self._check_identical(state)
        if self.rank != 0:
            return
        checkpoint_io.save_params(os.path.join(folder, GALLERY_FILE), *self.gallery.get_params())
        path = os.path.join(folder, QUEUE_FILE)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **state)
        os.replace(path + ".tmp", path)
        fileio.atomic_write_bytes(os.path.join(folder, "ffc.json"), json.dumps(
            {"queue_size": self.cfg.queue_size, "embedding_size": self.cfg.embedding_size,
             "identities_in_queue": int(len(state["slots"]))}).encode())

    def _check_identical(self, state):
        """Every rank's queue must be the same bytes (they apply the same inserts); a difference is a bug."""
        crc = 0
        for key in sorted(state):
            crc = zlib.crc32(np.ascontiguousarray(state[key]).tobytes(), crc)
        every = dist.allgather(np.array([crc], np.int64), name="ffc.queue_crc")
        if len(set(every.tolist())) != 1:
            raise RuntimeError("FFC: the queue differs between ranks (crc32 per rank: %s)" % every.tolist())

    def load(self, folder):
        for name in (GALLERY_FILE, QUEUE_FILE):
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError("FFC checkpoint file %s not found (was %s written by an FFC run?)"
                                        % (os.path.join(folder, name), folder))
        self.gallery.set_params(*checkpoint_io.load_params(os.path.join(folder, GALLERY_FILE)))
        with np.load(os.path.join(folder, QUEUE_FILE)) as data:
            self.queue.load_state_dict({k: data[k] for k in data.files})

    def shard_rows(self):
        """Nothing is sharded: the queue and the gallery are the same on every rank."""
        return 0, 0

    def snapshot(self):
        """Copies of the gallery's parameters and of the queue (identical on every rank), the gallery's BatchNorm
        moving statistics rank 0's (a collective: they follow each rank's batches; a checkpoint keeps rank 0's)."""
        arg, aux = self.gallery.get_params()
        aux = {k: dist.broadcast(v, name="ffc.snapshot." + k) for k, v in aux.items()}     # all sent, then read
        return Snapshot({"gallery_arg": {k: v.asnumpy() for k, v in arg.items()},
                         "gallery_aux": {k: v.asnumpy() for k, v in aux.items()},
                         "queue": self.queue.state_dict()}, {})

    def load_snapshot(self, shared, rows):
        self.gallery.set_params({k: mx.nd.array(v, dtype=v.dtype) for k, v in shared["gallery_arg"].items()},
                                {k: mx.nd.array(v, dtype=v.dtype) for k, v in shared["gallery_aux"].items()})
        self.queue.load_state_dict(shared["queue"])

    def close(self):
        """Stop both loaders' threads and close their files."""
        try:
            if self.ids is not None:
                self.ids.close()
        finally:
            self.instances.close()
