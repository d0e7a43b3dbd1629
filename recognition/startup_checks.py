"""Start-up checks of a run on several ranks, before the first step: what fails on some ranks only (typically
on some hosts only) stops every rank at the same point, with one error naming the hosts, ranks and paths.

* The output folder must be one shared folder: every rank writes its centre shard into the checkpoint folder, so
  a rank that sees another folder at the same path (a local disk, a missing mount) would break the first
  checkpoint, hours into the run. Rank 0 writes a marker file with a random token into the folder; every rank
  reads it back and writes a probe file of its own; the ranks then agree on the outcome.
* Errors in building the training method (its readers open and scan the data files there) are agreed across
  ranks by the trainer (``dist.on_every_rank``): every rank stops there with the same error, naming the host and
  the file, instead of one rank failing alone while the others go on into a collective it never joins.

With one process nothing is checked and no collective is issued (``recognition.dist``).
"""
import os
import time

import numpy as np

from recognition import dist
from recognition.dist import host_name, on_every_rank

MARKER_PREFIX = ".startup-check-"


def check_shared_output(folder, wait=5.0):
    """Every rank sees the folder rank 0 sees at ``folder`` and can write into it, or every rank raises a
    ``dist.AgreedError`` naming the hosts that do not. ``wait``: seconds a rank looks for rank 0's marker (a network file
    system may show a new file on other hosts with a short delay)."""
    if dist.size() == 1:
        return
    folder = os.path.abspath(folder)
    rank = dist.rank()
    token = on_every_rank(lambda: _write_marker(folder) if rank == 0 else 0, "making the output folder")
    token = int(dist.broadcast(np.array([token], np.int64), name="startup.output.token")[0])
    first_host = dist.allgather_object(host_name(), "startup.output.hosts")[0]
    marker = os.path.join(folder, "%s%016x" % (MARKER_PREFIX, token))
    try:
        on_every_rank(lambda: _find_marker(folder, marker, token, first_host, wait), "the shared output folder check")
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
