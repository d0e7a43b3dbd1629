"""Partial FC as a training method: one reader, one backbone pass, the Partial FC head.

One step on every rank: this rank's batch -> ``PartialFC.prepare`` (gathers the global batch's labels, samples
the centres and starts their pull from the memory bank on the bank thread) -> backbone forward, while the pull
runs -> ``PartialFC.forward_backward`` (margin softmax over the sampled centres) -> backbone backward with the
head's embedding gradient -> backbone update -> ``PartialFC.update`` (memory-bank SGD on the sampled centres,
queued on the bank thread: it runs beside the next step's forward, before that step's pull).
"""
import argparse

from recognition.config_checks import check_choice, check_range, parse_numbers
from recognition.data.build import build_reader
from recognition.method import Snapshot, TrainingMethod
from recognition.partial_fc.head import PartialFCHead
from recognition.partial_fc.operator import IGNORE_LABEL

LOSSES = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "combined": (1.0, 0.3, 0.2)}
BANK_LOCATIONS = ("device", "host", "disk")


class _LossFlag(argparse.Action):
    """``--loss``: an explicit loss replaces the preset's margins, unless ``--margins`` is given too."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, "loss", value)
        if not hasattr(namespace, "margins"):
            setattr(namespace, "margins", None)


class PartialFCMethod(TrainingMethod):
    """The trainer's interface to Partial FC (see ``recognition.method.TrainingMethod``)."""

    name = "pfc"
    accumulate = False          # one backward pass per step

    @classmethod
    def config_defaults(cls):
        return {
            "loss": "arcface",              # arcface | cosface | combined; picks the margins unless they are given
            "margins": None,                # (m1, m2, m3) of s * (cos(m1 * theta + m2) - m3); None: from `loss`
            "sample_ratio": 1.0,            # share of each rank's centres used per step (1.0: no sampling)
            "interclass_filter": 0.0,       # Partial FC v2: negatives above this cosine count as 0, no gradient
            "bank_location": "device",      # where centres + momentum live: device | host | disk
            "bank_dir": None,               # folder of a disk bank (None: a temporary folder)
            "bank_pipeline": True,          # bank pulls / pushes on a thread beside the backbone (bit-identical)
            "fc_weight_decay": 5e-4,        # class centres' weight decay
        }

    @classmethod
    def add_arguments(cls, parser):
        add = parser.add_argument
        add("--loss", action=_LossFlag, help="margin preset: " + ", ".join("%s %s" % kv for kv in LOSSES.items()))
        add("--margins", help="m1,m2,m3 of s*(cos(m1*theta+m2)-m3) on the target logit; overrides --loss")
        add("--sample-ratio", type=float, help="share of each rank's class centres sampled per step, in (0, 1]")
        add("--interclass-filter", type=float, help="Partial FC v2: a negative with cosine above this counts as "
            "cosine 0, with no gradient, as arcface_torch does (0: off)")
        add("--bank-location", choices=BANK_LOCATIONS, help="where class centres and their momentum live")
        add("--bank-dir", help="folder of the disk bank's file (--bank-location disk; read and written with "
            "pread/pwrite)")
        add("--bank-pipeline", action=argparse.BooleanOptionalAction, help="overlap the bank's I/O with the "
            "backbone on a thread (default; the result is bit-identical either way)")

    @classmethod
    def finalize_config(cls, cfg):
        check_choice(cfg, "loss", tuple(LOSSES))
        check_choice(cfg, "bank_location", BANK_LOCATIONS)
        margins = LOSSES[cfg.loss] if cfg.margins is None else cfg.margins
        cfg.margins = parse_numbers("--margins", margins, 3) if isinstance(margins, str) else tuple(
            float(m) for m in margins)
        if len(cfg.margins) != 3 or cfg.margins[0] <= 0:
            raise ValueError("margins must be (m1, m2, m3) with m1 > 0, got %r" % (cfg.margins,))
        check_range(cfg, "sample_ratio", 0.0, 1.0, low_open=True)
        check_range(cfg, "interclass_filter", 0.0, 1.0)
        check_range(cfg, "fc_weight_decay", 0.0)
        cfg.bank_pipeline = bool(cfg.bank_pipeline)
        if cfg.elastic and cfg.bank_location == "disk":
            raise ValueError("--elastic keeps each commit's centres in host memory; --bank-location disk is for "
                             "shards larger than that: train it without --elastic (checkpoints and --resume)")

    @classmethod
    def output_name(cls, cfg):
        return cfg.loss

    def __init__(self, cfg, ctx, rank, size):
        self.cfg = cfg
        self.reader = build_reader(cfg, rank, size)
        self.head = None
        try:
            self.head = PartialFCHead(cfg, ctx)
        except BaseException:
            self.reader.close()
            raise

    @property
    def steps_per_epoch(self):
        return self.reader.steps_per_epoch

    @property
    def probe_batch_size(self):
        return self.cfg.batch_size

    def describe(self):
        return "Partial FC: %d classes, sample_ratio %g, bank on %s" % (
            self.cfg.num_classes, self.cfg.sample_ratio, self.cfg.bank_location)

    def attach(self, backbone):
        """Nothing to set up beyond the head."""

    def batches(self, epoch, start_step=0):
        return self.reader.epoch(epoch, start_step=start_step)

    def train_step(self, backbone, batch, lr, clock):
        labels = batch.label
        if batch.pad:                    # padding rows (the epoch's end) are left out of the loss
            labels = labels.copy()
            labels[labels.size - batch.pad:] = IGNORE_LABEL
        self.head.prepare(labels)        # the labels are known before the backbone runs: start the bank pull
        clock.tick("head_prepare", None)
        embeddings = backbone.forward(batch.data)
        clock.tick("backbone_forward", embeddings)
        loss, grad = self.head.forward_backward(embeddings, labels)
        clock.tick("head", grad)
        backbone.backward(grad)
        backbone.update(lr)
        clock.tick("backbone_backward", None)
        self.head.update(lr)
        clock.tick("head_update", None)
        return loss

    def position(self, step):
        """Where the data stands after ``step`` steps (written into the checkpoint's state.json)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": in_epoch}

    def save(self, folder):
        """Every rank writes its centre shard."""
        self.head.save(folder)

    def load(self, folder):
        self.head.load(folder)

    def shard_rows(self):
        """This rank's classes: its rows of the centres and their momentum."""
        pfc = self.head.pfc
        return pfc.class_start, pfc.class_start + pfc.num_local

    def snapshot(self):
        return Snapshot(*self.head.snapshot())

    def load_snapshot(self, shared, rows):
        self.head.load_snapshot(shared, rows)

    def close(self):
        """Stop the bank thread (after its queued jobs) and close the reader."""
        try:
            if self.head is not None:
                self.head.close()
        finally:
            self.reader.close()
