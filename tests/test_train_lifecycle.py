"""Every run closes its training method: no thread of a reader, a loader or the memory bank outlives it, whether
the run ends, fails or is stopped by SIGTERM. In-process runs with the tiny backbone (tests/conftest.py)."""
import os
import signal
import threading

import pytest

from tests.test_golden_runs import write_faces

pytestmark = pytest.mark.usefixtures("tiny_backbone")

PFC = ["--dataset", "bench_1m", "--num-classes", "50", "--embedding-size", "16", "--batch-size", "4",
       "--sample-ratio", "0.5", "--bank-pipeline", "--lr", "0.1", "--max-steps", "4", "--frequent", "1",
       "--verbose", "0", "--checkpoint-every", "2"]
FFC = ["--dataset", "synthetic_ffc", "--queue-size", "6", "--embedding-size", "16", "--batch-size", "4", "--lr",
       "0.1", "--num-epochs", "1", "--max-steps", "4", "--frequent", "1", "--verbose", "0", "--checkpoint-every", "2",
       "--preprocess-threads", "2", "--val-targets", ""]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lifecycle_faces"))
    write_faces(folder)
    return folder


def _trainer(argv):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    return Trainer(config_from_args(argv))


def _argv(which, faces, out):
    return (PFC if which == "pfc" else FFC + ["--data-dir", faces]) + ["--output", str(out)]


def _new_threads(before):
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.mark.parametrize("which", ["pfc", "ffc"])
def test_a_finished_run_leaves_no_thread(which, faces, tmp_path):
    before = set(threading.enumerate())
    trainer = _trainer(_argv(which, faces, tmp_path / "run"))
    real_step, running = trainer.method.train_step, set()

    def watched(backbone, batch, lr, clock):
        running.update(_new_threads(before))
        return real_step(backbone, batch, lr, clock)
    trainer.method.train_step = watched
    trainer.fit()
    assert trainer.step == 4 and trainer.closed
    assert _new_threads(before) == [], "threads left after fit (running during it: %s)" % sorted(running)
    prefix = "pfc-bank" if which == "pfc" else "id-"
    assert any(name.startswith(prefix) for name in running), running   # there were threads to stop


@pytest.mark.parametrize("which", ["pfc", "ffc"])
def test_a_failing_step_still_closes_the_method(which, faces, tmp_path):
    before = set(threading.enumerate())
    trainer = _trainer(_argv(which, faces, tmp_path / "run"))
    real_step = trainer.method.train_step

    def failing(backbone, batch, lr, clock):
        if trainer.step == 2:
            raise RuntimeError("injected failure at step 2")
        return real_step(backbone, batch, lr, clock)
    trainer.method.train_step = failing
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.fit()
    assert trainer.closed and _new_threads(before) == []


def test_sigterm_checkpoints_closes_and_restores_the_handler(faces, tmp_path):
    before = set(threading.enumerate())
    handler = signal.getsignal(signal.SIGTERM)
    trainer = _trainer(_argv("ffc", faces, tmp_path / "run"))
    real_step = trainer.method.train_step

    def signalled(backbone, batch, lr, clock):
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # caught by the loop: stop at the step boundary
        return real_step(backbone, batch, lr, clock)
    trainer.method.train_step = signalled
    with pytest.raises(SystemExit) as stop:
        trainer.fit()
    assert stop.value.code == 128 + signal.SIGTERM and trainer.step == 2
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_000000002")
    assert trainer.closed and _new_threads(before) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_method_that_fails_to_build_closes_what_it_opened(faces, tmp_path, monkeypatch):
    """FFC's queue fails after its loaders started threads: the loaders are closed before the error surfaces."""
    from recognition.ffc import method as ffc_method
    before = set(threading.enumerate())

    def broken(*args, **kwargs):
        raise ValueError("injected queue failure")
    monkeypatch.setattr(ffc_method, "DynamicClassQueue", broken)
    with pytest.raises(ValueError, match="injected queue failure"):
        _trainer(_argv("ffc", faces, tmp_path / "run"))
    assert _new_threads(before) == []
