"""Atomic checkpoint I/O: a process killed (SIGKILL) or an exception raised in the middle of a save leaves the
previous checkpoint whole and loadable; legacy checkpoints load with mx.model.load_checkpoint unchanged."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

from recognition import checkpoint_io as cio
from tests.harness import ROOT


def spawn(code):
    """A Python child running ``code`` from the repository root, its stdout a pipe."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


def no_temporaries(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")] == []


# ----------------------------------------------------------------------------------------------- files
def test_atomic_writes_replace_and_leave_nothing_behind(tmp_path):
    path = str(tmp_path / "sub" / "state.bin")
    cio.atomic_write_bytes(path, b"first")
    cio.atomic_write_bytes(path, b"second")
    with open(path, "rb") as f:
        assert f.read() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask        # not mkstemp's private 0600
    arrays = {"weight": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.array([2 ** 40], np.int64)}
    cio.atomic_save_numpy(str(tmp_path / "bank.state"), arrays)          # no ".npz" appended
    with np.load(str(tmp_path / "bank.state")) as loaded:
        assert sorted(loaded.files) == ["labels", "weight"]
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)
            assert loaded[key].dtype == value.dtype
    cio.atomic_save_ndarrays(str(tmp_path / "x.params"), {"a": mx.nd.array([1.5, 2.5])})
    np.testing.assert_array_equal(mx.nd.load(str(tmp_path / "x.params"))["a"].asnumpy(), [1.5, 2.5])
    assert no_temporaries(str(tmp_path)) and no_temporaries(str(tmp_path / "sub"))


class Unconvertible:
    """np.savez fails on it after it has already written the arrays before it."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("disk full (simulated)")


def test_exception_mid_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "bank.npz")
    cio.atomic_save_numpy(path, {"w": np.ones(4)})
    with pytest.raises(RuntimeError, match="disk full"):
        cio.atomic_save_numpy(path, {"w": np.zeros(1 << 20), "z": Unconvertible()})
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["w"], np.ones(4))
    assert os.listdir(str(tmp_path)) == ["bank.npz"]


def test_sigkill_after_the_data_is_written_before_the_rename(tmp_path):
    """The child stops inside the save (the new data fully in its temporary file) and is killed there."""
    path = str(tmp_path / "state.bin")
    cio.atomic_write_bytes(path, b"old good state")
    proc = spawn("""
        import os, sys, time
        from recognition import checkpoint_io
        def stall(fd):
            print("stalled", flush=True)
            time.sleep(60)
        os.fsync = stall
        checkpoint_io.atomic_write_bytes(%r, b"n" * (16 << 20))
    """ % path)
    try:
        assert proc.stdout.readline().strip() == "stalled", proc.stderr.read()
        temporaries = [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]
        assert len(temporaries) == 1
        assert os.path.getsize(os.path.join(str(tmp_path), temporaries[0])) == 16 << 20
    finally:
        kill(proc)
    with open(path, "rb") as f:
        assert f.read() == b"old good state"


def test_sigkill_at_a_random_moment_never_leaves_a_partial_file(tmp_path):
    """The child rewrites a 24 MB file in a loop with two complete versions; killed at a random moment, the file
    is one of them in full. (Writing in place instead of atomically leaves a torn file here.)"""
    path = str(tmp_path / "big.bin")
    size = 24 << 20
    proc = spawn("""
        from recognition import checkpoint_io
        versions = [b"A" * %d, b"B" * %d]
        i = 0
        while True:
            checkpoint_io.atomic_write_bytes(%r, versions[i %% 2])
            if i == 0:
                print("first", flush=True)
            i += 1
    """ % (size, size, path))
    try:
        assert proc.stdout.readline().strip() == "first", proc.stderr.read()
        proc_wait = random.Random(os.getpid()).uniform(0.05, 0.4)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=proc_wait)
    finally:
        kill(proc)
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == size and data in (b"A" * size, b"B" * size)


# ------------------------------------------------------------------------------------- legacy MXNet
def small_net():
    data = mx.sym.Variable("data")
    body = mx.sym.FullyConnected(data, num_hidden=6, name="pre_fc")
    body = mx.sym.BatchNorm(body, fix_gamma=False, name="bn1")
    return mx.sym.FullyConnected(body, num_hidden=4, name="fc1")


def random_params(symbol, seed):
    module = mx.mod.Module(symbol, data_names=["data"], label_names=None)
    module.bind(data_shapes=[("data", (2, 5))], for_training=False)
    mx.random.seed(seed)
    module.init_params(mx.init.Normal(1.0))
    arg, aux = module.get_params()
    aux = {k: mx.nd.array(np.random.RandomState(seed).rand(*v.shape)) for k, v in aux.items()}
    return arg, aux


def assert_same(loaded, saved):
    assert sorted(loaded) == sorted(saved)
    for key in saved:
        np.testing.assert_array_equal(loaded[key].asnumpy(), saved[key].asnumpy())


def test_legacy_checkpoint_loads_with_mxnet(tmp_path):
    symbol = small_net()
    arg, aux = random_params(symbol, 1)
    prefix = str(tmp_path / "model")
    cio.save_legacy_checkpoint(prefix, 7, symbol, arg, aux)
    assert sorted(os.listdir(str(tmp_path))) == ["model-0007.params", "model-symbol.json"]
    sym2, arg2, aux2 = mx.model.load_checkpoint(prefix, 7)
    assert sym2.tojson() == symbol.tojson()
    assert_same(arg2, arg)
    assert_same(aux2, aux)
    assert sorted(aux2) == ["bn1_moving_mean", "bn1_moving_var"]
    raw = mx.nd.load(prefix + "-0007.params")
    assert all(k.startswith(("arg:", "aux:")) for k in raw)


def test_failed_legacy_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    symbol = small_net()
    arg, aux = random_params(symbol, 1)
    prefix = str(tmp_path / "model")
    cio.save_legacy_checkpoint(prefix, 3, symbol, arg, aux)
    real_save = mx.nd.save

    def crash_mid_write(fname, data):
        real_save(fname, {k: v[:1] for k, v in data.items()})     # part of the data reaches the file ...
        raise OSError("killed mid-write (simulated)")              # ... then the writer dies

    monkeypatch.setattr(mx.nd, "save", crash_mid_write)
    new_arg, new_aux = random_params(symbol, 2)
    with pytest.raises(OSError, match="mid-write"):
        cio.save_legacy_checkpoint(prefix, 3, symbol, new_arg, new_aux)
    monkeypatch.undo()
    _, arg2, aux2 = mx.model.load_checkpoint(prefix, 3)
    assert_same(arg2, arg)
    assert_same(aux2, aux)
    assert no_temporaries(str(tmp_path))


def test_legacy_checkpoint_rejects_parameters_of_another_graph(tmp_path):
    symbol = small_net()
    arg, aux = random_params(symbol, 1)
    arg["softmax_weight"] = mx.nd.zeros((3, 4))
    with pytest.raises(ValueError, match="arg_params holds softmax_weight"):
        cio.save_legacy_checkpoint(str(tmp_path / "model"), 1, symbol, arg, aux)
    assert os.listdir(str(tmp_path)) == []


# -------------------------------------------------------------------------------------------- folders
def write_folder(folder, tag):
    for name in ("backbone.params", "shard_0.npy"):
        with open(os.path.join(folder, name), "w") as f:
            f.write("%s %s" % (tag, name))


def read_folder(folder):
    return {n: open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder))}


def test_atomic_dir_commits_and_replaces(tmp_path):
    final = str(tmp_path / "latest")
    with cio.atomic_dir(final) as tmp:
        assert tmp == final + ".tmp" and os.path.isdir(tmp)
        write_folder(tmp, "v1")
    assert read_folder(final) == {"COMPLETE": "", "backbone.params": "v1 backbone.params",
                                  "shard_0.npy": "v1 shard_0.npy"}
    with cio.atomic_dir(final) as tmp:
        write_folder(tmp, "v2")
    assert read_folder(final)["shard_0.npy"] == "v2 shard_0.npy"
    assert os.listdir(str(tmp_path)) == ["latest"]


def test_exception_inside_atomic_dir_keeps_the_previous_folder(tmp_path):
    final = str(tmp_path / "latest")
    with cio.atomic_dir(final) as tmp:
        write_folder(tmp, "v1")
    before = read_folder(final)
    with pytest.raises(RuntimeError, match="rank 1 died"):
        with cio.atomic_dir(final) as tmp:
            write_folder(tmp, "v2")
            raise RuntimeError("rank 1 died")
    assert read_folder(final) == before
    assert os.listdir(str(tmp_path)) == ["latest"]


def test_sigkill_while_a_folder_is_staged(tmp_path):
    """A run killed while its ranks write into the staging folder: the last committed one is what resumes."""
    root = str(tmp_path)
    with cio.atomic_dir(os.path.join(root, "step_000000100")) as tmp:
        write_folder(tmp, "step100")
    proc = spawn("""
        import os, time
        from recognition import checkpoint_io
        tmp = checkpoint_io.prepare_dir(%r)
        with open(os.path.join(tmp, "shard_0.npy"), "wb") as f:
            f.write(b"x" * (4 << 20))
        print("staged", flush=True)
        time.sleep(60)
        checkpoint_io.commit_dir(tmp, %r)
    """ % ((os.path.join(root, "step_000000200"),) * 2))
    try:
        assert proc.stdout.readline().strip() == "staged", proc.stderr.read()
    finally:
        kill(proc)
    assert sorted(os.listdir(root)) == ["step_000000100", "step_000000200.tmp"]
    latest = cio.latest_complete(root, "step_*")
    assert latest == os.path.join(root, "step_000000100")
    assert read_folder(latest)["shard_0.npy"] == "step100 shard_0.npy"
    # the next save of that step starts from a clean staging folder
    assert os.listdir(cio.prepare_dir(os.path.join(root, "step_000000200"))) == []


def test_prepare_and_commit_as_used_by_several_ranks(tmp_path):
    final = str(tmp_path / "ckpt" / "step_000000010")
    os.makedirs(os.path.dirname(final))
    tmp = cio.prepare_dir(final)
    for rank in range(3):           # each rank writes its shard into the name every rank can compute
        with open(os.path.join(cio.staging_dir(final), "shard_%d" % rank), "w") as f:
            f.write(str(rank))
    cio.commit_dir(tmp, final)
    assert sorted(os.listdir(final)) == ["COMPLETE", "shard_0", "shard_1", "shard_2"]
    assert cio.latest_complete(os.path.dirname(final)) == final


def test_latest_complete(tmp_path):
    root = str(tmp_path)
    assert cio.latest_complete(os.path.join(root, "missing")) is None
    assert cio.latest_complete(root) is None
    for name in ("step_9", "step_10", "step_100.tmp", "best"):
        with cio.atomic_dir(os.path.join(root, name)):
            pass
    os.makedirs(os.path.join(root, "step_200"))         # no COMPLETE marker: not a checkpoint
    assert cio.latest_complete(root, "step_*") == os.path.join(root, "step_10")     # 10 after 9, by number
    assert cio.latest_complete(root, "best") == os.path.join(root, "best")
    # a crash between commit_dir's two renames leaves NAME.old (complete) and no NAME: it still counts
    os.replace(os.path.join(root, "step_10"), os.path.join(root, "step_10.old"))
    assert cio.latest_complete(root, "step_*") == os.path.join(root, "step_10.old")
    with cio.atomic_dir(os.path.join(root, "step_10")) as tmp:
        write_folder(tmp, "redone")
    assert cio.latest_complete(root, "step_*") == os.path.join(root, "step_10")
    assert not os.path.exists(os.path.join(root, "step_10.old"))
