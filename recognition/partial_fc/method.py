"""Partial FC as a training method: one reader, one backbone pass, the Partial FC head.

One step on every rank: this rank's batch -> ``PartialFC.prepare`` (gathers the global batch's labels, samples
the centres and starts their pull from the memory bank on the bank thread) -> backbone forward, while the pull
runs -> ``PartialFC.forward_backward`` (margin softmax over the sampled centres) -> backbone backward with the
head's embedding gradient -> backbone update -> ``PartialFC.update`` (memory-bank SGD on the sampled centres,
queued on the bank thread: it runs beside the next step's forward, before that step's pull).
"""
from recognition.data import build_reader
from recognition.partial_fc.head import PartialFCHead
from recognition.partial_fc.operator import IGNORE_LABEL


class PartialFCMethod:
    """The trainer's interface to Partial FC (see ``recognition.trainer`` for what a method provides)."""

    name = "pfc"
    accumulate = False          # one backward pass per step

    def __init__(self, cfg, ctx, rank, size):
        self.cfg = cfg
        self.reader = build_reader(cfg, rank, size)
        self.steps_per_epoch = self.reader.steps_per_epoch
        self.probe_batch_size = cfg.batch_size
        self.head = PartialFCHead(cfg, ctx)

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

    @property
    def timings(self):
        return self.head.timings

    def position(self, step):
        """Where the data stands after ``step`` steps (written into the checkpoint's state.json)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": in_epoch}

    def save(self, folder):
        """Every rank writes its centre shard."""
        self.head.save(folder)

    def load(self, folder):
        self.head.load(folder)
