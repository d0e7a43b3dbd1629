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


def allgather_object(obj, name):
    """Every rank's ``obj`` (anything picklable), as a list in rank order (two small allgathers)."""
    if size() == 1:
        return [obj]
    import pickle
    blob = np.frombuffer(pickle.dumps(obj, protocol=4), np.uint8)
    lengths = allgather(np.array([blob.size], np.int64), name=name + ".lengths")
    data = allgather(blob, name=name + ".data")
    out, offset = [], 0
    for length in lengths.tolist():
        out.append(pickle.loads(data[offset:offset + length].tobytes()))
        offset += length
    return out


class AgreedError(ValueError):
    """An error that every rank raises alike because it happened on some (``on_every_rank``)."""


def host_name():
    """This rank's host as horovodrun names it (``-H``), else the machine's name."""
    import os
    import socket
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def on_every_rank(action, what, cleanup=None):
    """``action()`` on every rank, then agree: when it raised on any rank, every rank raises one AgreedError
    naming each failing host, its ranks and its error (hosts and ranks that met the same error together), so no
    rank goes on into a collective the others never join. A rank whose own error is not about its input (not an
    OSError / ValueError / MXNetError: a bug) re-raises it, with its traceback, once the others know.
    ``cleanup(result)`` releases what a rank built when another rank failed. Costs one small allreduce when
    nothing failed."""
    import mxnet as mx
    error, result = None, None
    try:
        result = action()
    except Exception as err:    # noqa: BLE001 - whatever failed, the other ranks must hear of it
        error = err
    failed = int(allreduce(np.array([error is not None], np.int32), name="agree." + what, op="max")[0])
    if not failed:
        return result
    if error is None and cleanup is not None:
        cleanup(result)
    mine = "" if error is None else "%s: %s" % (type(error).__name__, str(error).strip() or repr(error))
    every = allgather_object((mine, host_name()), "agree.%s.errors" % what)
    message = "%s failed %s" % (what, describe_failures([e for e, _ in every], [h for _, h in every]))
    if error is not None and not isinstance(error, (OSError, ValueError, mx.base.MXNetError)):
        raise error
    raise AgreedError(message) from error


def describe_failures(reports, hosts):
    """'on host H (ranks 2, 3): ERROR; on host ...' from every rank's error text ('' where it went well): the
    hosts and ranks that met the same error are named together."""
    by_error = {}
    for rank, (report, host) in enumerate(zip(reports, hosts)):
        if report:
            by_error.setdefault(report, {}).setdefault(host, []).append(rank)
    parts = []
    for report, where in by_error.items():           # in the order of the first rank that met each error
        places = ["host %s (rank%s %s)" % (host, "s" if len(ranks) > 1 else "", ", ".join(map(str, ranks)))
                  for host, ranks in where.items()]
        parts.append("on %s: %s" % (" and ".join(places), report))
    return "; ".join(parts)
