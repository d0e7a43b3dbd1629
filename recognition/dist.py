"""Thin Horovod wrapper used by the Partial FC operator and the trainer.

Collectives take and return NumPy arrays or NDArrays (the same kind comes back). With one process no
collective is issued at all, so single-process runs need neither horovodrun nor a working Gloo ring (Horovod
must still be initialised by the caller, as Horovod's own API requires).
"""
import numpy as np
import mxnet as mx

try:
    import horovod.mxnet as hvd
except ImportError:  # pragma: no cover - the project always installs horovod; keep imports readable
    hvd = None


def _require_hvd():
    if hvd is None:
        raise RuntimeError("horovod.mxnet is not importable: run `make setup` (it builds Horovod with MXNet)")
    return hvd


def rank():
    return _require_hvd().rank()


def size():
    return _require_hvd().size()


def local_rank():
    return _require_hvd().local_rank()


def _to_nd(x):
    if isinstance(x, mx.nd.NDArray):
        return x, False
    x = np.ascontiguousarray(x)
    return mx.nd.array(x, dtype=x.dtype, ctx=mx.cpu()), True


def _back(out, was_numpy):
    return out.asnumpy() if was_numpy else out


def allgather(x, name):
    """Concatenate every rank's ``x`` along axis 0 (first dimensions may differ)."""
    if size() == 1:
        return x
    nd, was_numpy = _to_nd(x)
    return _back(hvd.allgather(nd, name=name), was_numpy)


def allreduce(x, name, op="sum"):
    """Element-wise reduction over ranks: op is 'sum', 'max' or 'min'."""
    if size() == 1:
        return x
    ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
    nd, was_numpy = _to_nd(x)
    return _back(hvd.allreduce(nd, op=ops[op], name=name), was_numpy)


def reducescatter_sum(x, name):
    """Sum ``x`` over ranks and give rank r back its own block of rows (equal blocks of axis 0)."""
    if size() == 1:
        return x
    if x.shape[0] % size():
        raise ValueError("reducescatter_sum needs axis 0 (%d) divisible by the world size %d" % (x.shape[0], size()))
    nd, was_numpy = _to_nd(x)
    return _back(hvd.reducescatter(nd, op=hvd.Sum, name=name), was_numpy)


def broadcast(x, name, root=0):
    if size() == 1:
        return x
    nd, was_numpy = _to_nd(x)
    return _back(hvd.broadcast(nd, root_rank=root, name=name), was_numpy)


def barrier(name="barrier"):
    """Every rank waits here for the others (a tiny allreduce: Horovod's MXNet API has no barrier)."""
    if size() > 1:
        allreduce(np.zeros(1, np.float32), name=name)


def shard_range(num_classes, world_size, r):
    """Rank r's contiguous slice [start, end) of ``num_classes`` ids; slice sizes differ by at most one."""
    base, extra = divmod(int(num_classes), int(world_size))
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)
