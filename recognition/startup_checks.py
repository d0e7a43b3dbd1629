"""Start-up checks of a run on several ranks, before the first step: what fails on some ranks only (typically
on some hosts only) stops every rank at the same point, with one error naming the hosts, ranks and paths.

* The output folder must be one shared folder: every rank writes its centre shard into the checkpoint folder, so
  a rank that sees another folder at the same path (a local disk, a missing mount) would break the first
  checkpoint, hours into the run. Rank 0 writes a marker file with a random token into the folder; every rank
  reads it back and writes a probe file of its own; the ranks then agree on the outcome.
* Errors in building the training method (its readers open and scan the data files there) are agreed across
  ranks: every rank stops there with the same error, naming the host and the file, instead of one rank failing
  alone while the others go on into a collective it never joins (and fail with "Horovod has been shut down", or
  wait, while it lives).

With one process nothing is checked and no collective is issued (``recognition.dist``).
"""
import os
import socket
import time

import numpy as np
import mxnet as mx

from recognition import dist

MARKER_PREFIX = ".startup-check-"
# errors that are about the input (files, paths, values): reported as StartupError without a traceback
_INPUT_ERRORS = (OSError, ValueError, mx.base.MXNetError)


class StartupError(ValueError):
    """A start-up check failed on at least one rank; every rank raises it with the same message."""


def host_name():
    """This rank's host as horovodrun names it (``-H``), else the machine's name."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def gather_text(text, name):
    """Every rank's ``text`` (a str), in rank order (two allgathers: lengths, then bytes)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = dist.allgather(np.array([data.size], np.int64), name=name + ".lengths")
    every = dist.allgather(data, name=name + ".text")
    ends = np.cumsum(lengths)
    return [every[end - length:end].tobytes().decode("utf-8", "replace") for end, length in zip(ends, lengths)]


def agree(action, what, key):
    """``action()`` on every rank; returns its result. When it raises on any rank, every rank raises one
    StartupError naming each failing host, its ranks and its error (a rank whose error is not about its input,
    e.g. a bug, re-raises its own, with its traceback, once the others know). ``what`` names the action in the
    message, ``key`` its collectives."""
    error = None
    try:
        result = action()
    except Exception as err:      # noqa: BLE001 - any failure here must be agreed, or the others hang
        error = err
    failed = dist.allreduce(np.array([error is not None], np.int32), name="startup.%s.failed" % key, op="max")[0]
    if not failed:
        return result
    mine = "" if error is None else "%s: %s" % (type(error).__name__, str(error).strip() or repr(error))
    reports = gather_text(mine, "startup.%s.errors" % key)
    hosts = gather_text(host_name(), "startup.%s.hosts" % key)
    message = "%s failed %s" % (what, describe_failures(reports, hosts))
    if error is not None and not isinstance(error, _INPUT_ERRORS):
        raise error
    raise StartupError(message) from error


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


def check_shared_output(folder, wait=5.0):
    """Every rank sees the folder rank 0 sees at ``folder`` and can write into it, or every rank raises a
    StartupError naming the hosts that do not. ``wait``: seconds a rank looks for rank 0's marker (a network file
    system may show a new file on other hosts with a short delay)."""
    if dist.size() == 1:
        return
    folder = os.path.abspath(folder)
    rank = dist.rank()
    token = agree(lambda: _write_marker(folder) if rank == 0 else 0, "making the output folder", "output_make")
    token = int(dist.broadcast(np.array([token], np.int64), name="startup.output.token")[0])
    first_host = gather_text(host_name(), "startup.output.hosts")[0]
    marker = os.path.join(folder, "%s%016x" % (MARKER_PREFIX, token))
    try:
        agree(lambda: _find_marker(folder, marker, token, first_host, wait), "the shared output folder check",
              "output_shared")
    finally:
        if rank == 0:
            _remove(marker)


def _write_marker(folder):
    token = int.from_bytes(os.urandom(8), "little") >> 1          # a positive int64
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, "%s%016x" % (MARKER_PREFIX, token))
    with open(marker, "w") as f:
        f.write("%d %s\n" % (token, host_name()))
        f.flush()
        os.fsync(f.fileno())
    return token


def _find_marker(folder, marker, token, first_host, wait):
    """This rank sees rank 0's marker (looking for ``wait`` seconds) and can write a file beside it."""
    deadline = time.monotonic() + wait
    while not os.path.isfile(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not os.path.isfile(marker):
        seen = ("the folder does not exist there" if not os.path.isdir(folder) else
                "the folder there is another one: it lacks the marker file %s that rank 0 wrote" % marker)
        raise FileNotFoundError(
            "the output folder %s is not the one rank 0 sees on host %s (%s). It must be one folder shared by every "
            "host (e.g. an NFS mount at the same path): every rank writes its centre shard into the checkpoints"
            % (folder, first_host, seen))
    with open(marker) as f:
        if f.read().split()[:1] != [str(token)]:
            raise ValueError("the output folder %s: marker file %s holds another run's token" % (folder, marker))
    probe = "%s.rank%d" % (marker, dist.rank())
    with open(probe, "w") as f:             # every rank writes its shard there: can it write at all?
        f.write("ok\n")
    os.remove(probe)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def start(cfg, build_method):
    """What the trainer runs once before it builds anything else: the shared output check, then
    ``build_method()`` (the training method: its readers open the data files) with its errors agreed across
    ranks. Returns the method."""
    check_shared_output(cfg.output)
    return agree(build_method, "building the %s method (its data readers)" % cfg.method, "method")
