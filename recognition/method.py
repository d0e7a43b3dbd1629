"""The contract between the training loop (``trainer.py``) and a training method (Partial FC, FFC, ...).

A method owns its data loaders and its classification head and runs one step; the loop around it (learning rate,
progress, verification, checkpoints, resume, signals) is the same for every method. A new method is a package
with a ``TrainingMethod`` subclass, registered by name in ``recognition/methods.py`` (or at run time with
``methods.register_method``). It declares its own configuration keys and flags here; config.py merges them.

The life of a method in a run, on every rank:

    cls.config_defaults() / add_arguments / finalize_config / output_name     while the config is built
    method = cls(cfg, ctx, rank, size)       the config is frozen by now; loaders and head are built
    method.attach(backbone)                  once the backbone's parameters are final on every rank
    method.load(folder)                      --pretrained-head or --resume: the method's part of a checkpoint
    for batch in method.batches(epoch, start_step):
        loss = method.train_step(backbone, batch, lr, clock)
        method.position(step); method.save(folder)          at checkpoints (every rank calls save)
        method.snapshot()                    --elastic: at every commit, in memory (every rank, the same step)
    method.close()                           always: at the end, on an error and on SIGTERM

An elastic run (``recognition/elastic.py``) builds a new method for every world it trains on, then gives it the
last commit: ``method.load_snapshot(shared, rows)``, where ``rows`` holds exactly the rows ``method.shard_rows()``
names, gathered from the ranks that kept them, whatever the world size that committed them.
"""
from abc import ABC, abstractmethod
from typing import NamedTuple


class Snapshot(NamedTuple):
    """A method's state on one rank in host memory (an elastic commit): nothing in it refers to the world size.

    ``shared``: what is identical on every rank, picklable (FFC's queue and gallery: what differs between ranks,
    such as BatchNorm moving statistics, is taken from rank 0, as a checkpoint does). ``rows``: {name: NumPy array
    (n, ...)} of this rank's rows ``shard_rows()`` of the tables the method shards over the ranks by rows (Partial
    FC's centres and their momentum); {} when it shards nothing."""
    shared: dict
    rows: dict


class TrainingMethod(ABC):
    """A training method, as the training loop drives it. See the module docstring for the life of one."""

    #: the name ``--method`` picks it by
    name = None
    #: True when a step runs several backward passes before its one update (the backbone then adds gradients)
    accumulate = False

    # ---------------------------------------------------------------------------- configuration (class-level)
    @classmethod
    def config_defaults(cls):
        """{key: default} of the configuration keys this method owns (merged into configs/base.py's keys; a
        preset may set them). Keys must not collide with the shared ones or another method's."""
        return {}

    @classmethod
    def add_arguments(cls, parser):
        """Add this method's command-line flags to ``parser`` (an argparse group). Each flag's ``dest`` is the
        config key it sets; the flag's value, when given, replaces the preset's."""

    @classmethod
    def finalize_config(cls, cfg):
        """Validate this method's keys in ``cfg`` (raise ValueError naming the key and the value) and fill its
        derived keys. Runs once, before the config is frozen."""

    @classmethod
    def output_name(cls, cfg):
        """The part of the default output folder name (``<dataset>_<network>_<this>``) that names the head."""
        return cls.name

    # ------------------------------------------------------------------------------------------- a run
    @abstractmethod
    def __init__(self, cfg, ctx, rank, size):
        """Build the method's loaders and head for rank ``rank`` of ``size`` on device ``ctx``. A data error
        must not leave other ranks waiting: raise before any collective, or through one every rank joins."""

    @property
    @abstractmethod
    def steps_per_epoch(self):
        """Steps of one epoch of this method's main loader (the learning-rate schedule counts in these)."""

    @property
    @abstractmethod
    def probe_batch_size(self):
        """Rows of one backbone forward on this rank (what the backbone is bound for)."""

    @abstractmethod
    def describe(self):
        """One line for the start-up log: the method and its main settings."""

    @abstractmethod
    def attach(self, backbone):
        """Called once with the ``backbone.Backbone`` the loop trains, after its parameters are final on every
        rank and before the first ``load`` or step."""

    @abstractmethod
    def batches(self, epoch, start_step=0):
        """An iterator over the batches of steps ``start_step``, ``start_step + 1``, ... of ``epoch``; the loop
        may stop early (a checkpoint's resume, the last step), so close resources in a ``finally``."""

    @abstractmethod
    def train_step(self, backbone, batch, lr, clock):
        """One step on ``batch`` at learning rate ``lr``: forward(s), backward(s), one backbone update
        (``backbone.update(lr)``) and the head's update. Returns the global loss (the same float on every rank).
        ``clock.tick(phase, result)`` marks the end of a phase (benchmarks time them)."""

    @abstractmethod
    def position(self, step):
        """Where the method's data stands after ``step`` steps, a JSON-ready dict (kept in the checkpoint)."""

    @abstractmethod
    def save(self, folder):
        """Write the method's state into the checkpoint folder being assembled; called on every rank."""

    @abstractmethod
    def load(self, folder):
        """Restore the method's state from a checkpoint folder written on any number of ranks."""

    @abstractmethod
    def shard_rows(self):
        """(start, end): the rows of the method's row-sharded tables this rank holds in this world ((0, 0) when it
        shards nothing); the ranks' ranges tile [0, rows) in rank order."""

    @abstractmethod
    def snapshot(self):
        """This rank's state after the last step, as a ``Snapshot`` of host-memory copies (later steps must not
        change them). Called on every rank at the same step; it may use collectives (e.g. to agree that the
        method's own queued work finished everywhere)."""

    @abstractmethod
    def load_snapshot(self, shared, rows):
        """Restore the state of a ``Snapshot`` taken on any number of ranks: its ``shared`` part, and ``rows``
        ({name: array}) holding exactly this rank's ``shard_rows()``. Called once, before any step, after
        ``attach``. Copy what is kept: the snapshot stays the commit a later restart may need again."""

    @abstractmethod
    def close(self):
        """Stop the method's threads and close its files. Called once, at the end of every run, also after an
        error; it must not raise because the run stopped half-way."""
