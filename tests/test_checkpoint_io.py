"""Atomic checkpoint folders: a process killed (SIGKILL) or an exception raised in the middle of a save leaves
the previous checkpoint whole and loadable; legacy checkpoints load with mx.model.load_checkpoint unchanged.
(Single-file atomic writes: tests/utils/test_fileio.py.)"""
import os
import zlib

import mxnet as mx
import numpy as np
import pytest

from recognition import checkpoint_io as cio
from tests.utils.test_fileio import kill, no_temporaries, spawn


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
    folder = read_folder(final)
    assert folder.pop("COMPLETE") != "" and folder == {"backbone.params": "v1 backbone.params",
                                                       "shard_0.npy": "v1 shard_0.npy"}
    assert cio.read_manifest(final) == {name: [len(text), zlib.crc32(text.encode())] for name, text in folder.items()}
    assert cio.verify_files(final, cio.read_manifest(final), sorted(folder)) == []
    with open(os.path.join(final, "shard_0.npy"), "w") as f:
        f.write("v1 shard_0.npX")                       # the same size, another content
    assert cio.verify_files(final, cio.read_manifest(final), ["shard_0.npy"]) == [
        "%s does not match its checksum (CRC-32 %08x, %08x when written)" % (
            os.path.join(final, "shard_0.npy"), zlib.crc32(b"v1 shard_0.npX"), zlib.crc32(b"v1 shard_0.npy"))]
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
