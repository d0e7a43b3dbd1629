"""The training-method contract (recognition/method.py, recognition/methods.py) from the outside.

A minimal method is defined here, in the test, registered at run time, and trained, checkpointed and resumed
through train.py's own entry point (``recognition.train.main``) without touching recognition/: its own config
key and flag, its part of the checkpoint, exact resume, and close() at the end of every run.
"""
import os

import numpy as np
import pytest

from recognition.config_checks import check_range
from recognition.method import Snapshot, TrainingMethod
from tests.harness import run_ranks

WEIGHT_FILE = "softmax_weight.npy"


class ReplicatedSoftmax(TrainingMethod):
    """A plain softmax classifier over every class, replicated on every rank: the smallest complete method."""

    name = "replicated_softmax"
    closed = []                     # the instances close() was called on (this process)

    @classmethod
    def config_defaults(cls):
        return {"softmax_temperature": 1.0}

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--softmax-temperature", type=float, dest="softmax_temperature")

    @classmethod
    def finalize_config(cls, cfg):
        check_range(cfg, "softmax_temperature", 0.0, low_open=True)

    @classmethod
    def output_name(cls, cfg):
        return "softmax_t%g" % cfg.softmax_temperature

    def __init__(self, cfg, ctx, rank, size):
        from recognition.data.build import build_reader
        self.cfg, self.rank = cfg, rank
        self.reader = build_reader(cfg, rank, size)
        rng = np.random.default_rng(cfg.seed)
        self.weight = (0.01 * rng.standard_normal((cfg.num_classes, cfg.embedding_size))).astype(np.float32)

    @property
    def steps_per_epoch(self):
        return self.reader.steps_per_epoch

    @property
    def probe_batch_size(self):
        return self.cfg.batch_size

    def describe(self):
        return "replicated softmax over %d classes" % self.cfg.num_classes

    def attach(self, backbone):
        pass

    def batches(self, epoch, start_step=0):
        return self.reader.epoch(epoch, start_step=start_step)

    def train_step(self, backbone, batch, lr, clock):
        import mxnet as mx
        from recognition import dist
        x_local = backbone.forward(batch.data).asnumpy().astype(np.float64)
        x = dist.allgather(x_local, name="softmax.x")
        y = dist.allgather(np.asarray(batch.label, np.int64), name="softmax.y")
        w = self.weight.astype(np.float64)
        z = x @ w.T / self.cfg.softmax_temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(-np.mean(np.log(p[rows, y])))
        dz = p
        dz[rows, y] -= 1.0
        dz /= len(y) * self.cfg.softmax_temperature
        own = slice(self.rank * len(x_local), (self.rank + 1) * len(x_local))
        backbone.backward(mx.nd.array((dz @ w)[own]))     # d(global loss) / d(this rank's embeddings)
        backbone.update(lr)
        self.weight -= np.float32(lr) * (dz.T @ x).astype(np.float32)
        return loss

    def position(self, step):
        return {"epoch": step // self.steps_per_epoch}

    def save(self, folder):
        if self.rank == 0:       # the same on every rank
            np.save(os.path.join(folder, WEIGHT_FILE), self.weight)

    def load(self, folder):
        self.weight = np.load(os.path.join(folder, WEIGHT_FILE))

    def shard_rows(self):
        return 0, 0             # the weight is replicated, not sharded

    def snapshot(self):
        return Snapshot({"weight": self.weight.copy()}, {})

    def load_snapshot(self, shared, rows):
        self.weight = shared["weight"].copy()

    def close(self):
        self.reader.close()
        ReplicatedSoftmax.closed.append(self)


FLAGS = ["--dataset", "bench_1m", "--method", "replicated_softmax", "--softmax-temperature", "0.5",
         "--num-classes", "37", "--embedding-size", "16", "--batch-size", "4", "--lr", "0.2", "--num-epochs", "1",
         "--frequent", "1", "--verbose", "0", "--checkpoint-every", "3"]


def contract_body(argv):
    """Register the method, run train.py's main; return its exit code and what the run left behind."""
    from recognition import methods
    from recognition.checkpoint_io import latest_complete, load_params
    from recognition.train import main
    from tests.conftest import patch_backbone
    patch_backbone()
    methods.register_method(ReplicatedSoftmax)
    code = main(argv)
    output = argv[argv.index("--output") + 1]
    folder = latest_complete(os.path.join(output, "checkpoints"), "step_*")
    arg, _ = load_params(os.path.join(folder, "backbone.params"))
    return {"code": code, "folder": os.path.basename(folder), "weight": np.load(os.path.join(folder, WEIGHT_FILE)),
            "arg": {k: v.asnumpy() for k, v in arg.items()}, "closed": len(ReplicatedSoftmax.closed)}


def test_a_method_defined_outside_recognition_trains_checkpoints_and_resumes(tmp_path):
    straight = run_ranks(contract_body, np=2, timeout=240,
                         kwargs={"argv": FLAGS + ["--max-steps", "6", "--output", str(tmp_path / "a")]})
    first = run_ranks(contract_body, np=2, timeout=240,
                      kwargs={"argv": FLAGS + ["--max-steps", "3", "--output", str(tmp_path / "b")]})
    resumed = run_ranks(contract_body, np=2, timeout=240,
                        kwargs={"argv": FLAGS + ["--max-steps", "6", "--resume", "--output", str(tmp_path / "b")]})
    for run in (straight, first, resumed):
        assert [r["code"] for r in run] == [0, 0] and [r["closed"] for r in run] == [1, 1]
    assert first[0]["folder"] == "step_000000003" and resumed[0]["folder"] == straight[0]["folder"] == "step_000000006"
    assert not np.array_equal(first[0]["weight"], straight[0]["weight"])
    np.testing.assert_array_equal(resumed[0]["weight"], straight[0]["weight"])
    for name in straight[0]["arg"]:
        np.testing.assert_array_equal(resumed[0]["arg"][name], straight[0]["arg"][name], err_msg=name)


def test_registry_and_config_take_the_method_in(monkeypatch):
    from recognition import config, methods
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))     # undone after the test
    methods.register_method(ReplicatedSoftmax)
    assert methods.method_class("replicated_softmax") is ReplicatedSoftmax
    cfg = config.config_from_args(FLAGS)
    assert (cfg.method, cfg.softmax_temperature) == ("replicated_softmax", 0.5)
    assert cfg.output.endswith("bench_1m_mbf_softmax_t0.5")
    with pytest.raises(ValueError, match="softmax_temperature must be > 0"):
        config.config_from_args(FLAGS + ["--softmax-temperature", "0"])
    with pytest.raises(ValueError, match="--softmax-temperature belongs to --method replicated_softmax"):
        config.config_from_args(["--dataset", "bench_1m", "--softmax-temperature", "2"])
    with pytest.raises(ValueError, match="unknown training method 'nope'; choose one of: pfc, ffc"):
        methods.method_class("nope")

    class Nameless(ReplicatedSoftmax):
        name = None
    with pytest.raises(ValueError, match="has no name"):
        methods.register_method(Nameless)

    class Impostor(ReplicatedSoftmax):
        name = "pfc"
    with pytest.raises(ValueError, match="'pfc' is taken by PartialFCMethod"):
        methods.register_method(Impostor)
    with pytest.raises(TypeError, match="must subclass"):
        methods.register_method(dict)


def test_the_contract_lists_what_the_trainer_uses():
    """Every member a method must provide is abstract in the base class, so a method missing one cannot be
    made; the calls of the trainer and of the elastic run are all members of the contract."""
    import ast
    from recognition import elastic, trainer
    abstract = set(TrainingMethod.__abstractmethods__)
    assert abstract == {"__init__", "steps_per_epoch", "probe_batch_size", "describe", "attach", "batches",
                        "train_step", "position", "save", "load", "shard_rows", "snapshot", "load_snapshot",
                        "close"}
    used = set()
    for module in (trainer, elastic):
        with open(module.__file__) as f:
            tree = ast.parse(f.read())
        used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Attribute) and node.value.attr == "method"}
    assert {"snapshot", "shard_rows", "load_snapshot"} <= used
    assert used <= abstract | {"accumulate"}, used - abstract

    class Incomplete(TrainingMethod):
        name = "incomplete"

        def __init__(self, cfg, ctx, rank, size):
            pass
    with pytest.raises(TypeError, match="abstract"):
        Incomplete(None, None, 0, 1)
