"""Atomic file writes: a process killed (SIGKILL) or an exception raised in the middle of a write leaves the
previous file whole; a set of files is replaced all together or not at all."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

from tests.harness import ROOT
from utils import fileio


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
    fileio.atomic_write_bytes(path, b"first")
    fileio.atomic_write_bytes(path, b"second")
    with open(path, "rb") as f:
        assert f.read() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask        # not mkstemp's private 0600
    arrays = {"weight": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.array([2 ** 40], np.int64)}
    fileio.atomic_save_numpy(str(tmp_path / "bank.state"), arrays)          # no ".npz" appended
    with np.load(str(tmp_path / "bank.state")) as loaded:
        assert sorted(loaded.files) == ["labels", "weight"]
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)
            assert loaded[key].dtype == value.dtype
    fileio.atomic_save_ndarrays(str(tmp_path / "x.params"), {"a": mx.nd.array([1.5, 2.5])})
    np.testing.assert_array_equal(mx.nd.load(str(tmp_path / "x.params"))["a"].asnumpy(), [1.5, 2.5])
    assert no_temporaries(str(tmp_path)) and no_temporaries(str(tmp_path / "sub"))


class Unconvertible:
    """np.savez fails on it after it has already written the arrays before it."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("disk full (simulated)")


def test_exception_mid_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "bank.npz")
    fileio.atomic_save_numpy(path, {"w": np.ones(4)})
    with pytest.raises(RuntimeError, match="disk full"):
        fileio.atomic_save_numpy(path, {"w": np.zeros(1 << 20), "z": Unconvertible()})
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["w"], np.ones(4))
    assert os.listdir(str(tmp_path)) == ["bank.npz"]


def test_sigkill_after_the_data_is_written_before_the_rename(tmp_path):
    """The child stops inside the save (the new data fully in its temporary file) and is killed there."""
    path = str(tmp_path / "state.bin")
    fileio.atomic_write_bytes(path, b"old good state")
    proc = spawn("""
        import os, sys, time
        from utils import fileio
        def stall(fd):
            print("stalled", flush=True)
            time.sleep(60)
        os.fsync = stall
        fileio.atomic_write_bytes(%r, b"n" * (16 << 20))
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
        from utils import fileio
        versions = [b"A" * %d, b"B" * %d]
        i = 0
        while True:
            fileio.atomic_write_bytes(%r, versions[i %% 2])
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




def test_a_set_of_files_is_replaced_together_or_not_at_all(tmp_path):
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    for path in (rec, idx):
        fileio.atomic_write_bytes(path, b"good " + os.path.basename(path).encode())
    with pytest.raises(ValueError, match="nothing usable"):
        with fileio.atomic_files(rec, idx) as (tmp_rec, tmp_idx):
            assert os.path.dirname(tmp_rec) == str(tmp_path) and tmp_rec.endswith(".tmp")
            with open(tmp_rec, "wb") as f:
                f.write(b"half")
            raise ValueError("nothing usable")
    assert open(rec, "rb").read() == b"good train.rec" and open(idx, "rb").read() == b"good train.idx"
    assert sorted(os.listdir(str(tmp_path))) == ["train.idx", "train.rec"]
    with fileio.atomic_files(rec, idx) as (tmp_rec, tmp_idx):
        for tmp, text in ((tmp_rec, b"new rec"), (tmp_idx, b"new idx")):
            with open(tmp, "wb") as f:
                f.write(text)
    assert open(rec, "rb").read() == b"new rec" and open(idx, "rb").read() == b"new idx"
    assert sorted(os.listdir(str(tmp_path))) == ["train.idx", "train.rec"]
