"""Training on two hosts as Horovod sees hosts: 127.0.0.2 and 127.0.0.3, each reached through a real sshd of its
own (``tests/multihost/sshd.py``), with ``horovodrun -np 4 -H 127.0.0.2:2,127.0.0.3:2 -p PORT --gloo``.

* 4 ranks on 2 hosts train Partial FC and FFC with checkpoints; each host's ranks get local ranks 0.. of their
  own, and ``--ctx auto`` follows them (a mocked GPU count); ``--resume`` continues on one host with 2 ranks.
* Partial FC's checkpoints equal, byte for byte, those of the same steps on one host with 4 ranks, for the
  splits 2+2 and 1+3. Every run here sets HOROVOD_FUSION_THRESHOLD=0: with Horovod's tensor fusion, which
  tensors share a fused allreduce depends on timing, and with more than 2 ranks the order in which an element's
  ranks are summed follows the fused buffer, so any two runs (one host or several) differ in the last bits.
* A lost host ends the job within seconds, and ``--resume`` finishes it on the remaining host.
* Host 127.0.0.3 sees one folder as an empty tmpfs (its sshd runs in a mount namespace of its own): an output
  folder there, or data files there, stop every rank at start-up with one error naming the host and the path.

The backbone is the tiny conv net of tests/conftest.py; a few steps per run.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from recognition import checkpoint_io
from tests.harness import ROOT, horovodrun_path
from tests.multihost import sshd
from tests.conftest import TINY_TRAIN_FLAGS as COMMON

A, B = "127.0.0.2", "127.0.0.3"
RANK_MAIN = os.path.join(ROOT, "tests", "multihost", "rank_train.py")
FFC_FLAGS = ["--dataset", "synthetic_ffc", "--embedding-size", "16", "--batch-size", "2", "--queue-size", "6",
             "--lr", "0.2", "--frequent", "1", "--verbose", "0", "--preprocess-threads", "1"]

_missing = sshd.why_not_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")
needs_namespaces = pytest.mark.skipif(sshd.why_not_available(need_namespaces=True) is not None,
                                      reason=sshd.why_not_available(need_namespaces=True) or "")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """The two hosts; B sees ``root/b_hidden`` as an empty tmpfs where it can (root, unshare)."""
    root = tmp_path_factory.mktemp("multihost")
    hidden = root / "b_hidden"
    hidden.mkdir()
    can_hide = sshd.why_not_available(need_namespaces=True) is None
    try:
        cluster = sshd.Cluster((A, B), hidden={B: str(hidden)} if can_hide else None)
    except RuntimeError as err:
        if os.geteuid() == 0:
            raise
        pytest.skip("sshd would not start without root: %s" % err)
    try:
        yield cluster, root
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def faces(hosts):
    """A small packed synthetic-identities set that both hosts read, and a copy in ``b_hidden`` (host B sees that
    folder empty)."""
    _, root = hosts
    folder = str(root / "faces")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"), folder, "--identities", "12",
                    "--images", "8", "--holdout", "6", "--pairs", "40", "--workers", "1"],
                   check=True, cwd=ROOT, capture_output=True)
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), str(root / "b_hidden"))
    return folder


class Job:
    """A finished horovodrun: exit code, seconds, output, and each rank's report (tests/multihost/rank_train.py)."""

    def __init__(self, rc, seconds, output, reports):
        self.rc, self.seconds, self.output, self.reports = rc, seconds, output, reports

    def rank_lines(self, rank, text):
        """Lines of rank ``rank``'s output (horovodrun prefixes them with [rank]) that contain ``text``."""
        return [line for line in self.output.splitlines() if line.startswith("[%d]<" % rank) and text in line]


def _env(cluster):
    env = cluster.env()
    for key in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY"):     # a rank has them only when started through sshd
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1", PYTHONUNBUFFERED="1", HOROVOD_FUSION_THRESHOLD="0",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               # horovodrun sets both from --network-interface on every rank, over what the environment says
               HOROVOD_GLOO_IFACE="not-this0", NCCL_SOCKET_IFNAME="not-this0")
    return env


def launch(cluster, work, np, host_list, argv):
    """Start ``horovodrun -np NP -H HOSTS`` (through ssh unless the hosts are localhost) on rank_train.py."""
    os.makedirs(work, exist_ok=True)
    ssh = [] if host_list.startswith("localhost") else cluster.ssh_args() + ["--network-interface", "lo"]
    cmd = [horovodrun_path(), "-np", str(np), "-H", host_list] + ssh + ["--gloo", "--disable-cache",
                                                                        sys.executable, RANK_MAIN, work] + argv
    log = open(os.path.join(work, "horovodrun.log"), "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(cluster), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    proc.started, proc.work = time.time(), work
    return proc


def finish(cluster, proc, timeout=300):
    """Wait for a launched job (killing it and anything it left on the hosts after ``timeout``)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        seconds = time.time() - proc.started
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        for host in cluster.hosts.values():
            host.kill_sessions()
    with open(os.path.join(proc.work, "horovodrun.log"), "rb") as f:
        output = f.read().decode("utf-8", "replace")
    if rc is None:
        raise AssertionError("the job ran past %d s and was killed; output:\n%s" % (timeout, output))
    reports = {}
    for name in os.listdir(proc.work):
        if name.startswith("rank") and name.endswith(".json"):
            with open(os.path.join(proc.work, name)) as f:
                found = json.load(f)
            reports[found["rank"]] = found
    return Job(rc, seconds, output, reports)


def run(cluster, work, np, host_list, argv, timeout=300):
    return finish(cluster, launch(cluster, work, np, host_list, argv), timeout)


def _pfc_argv(out, *extra):
    return COMMON + ["--output", str(out)] + list(extra)


def _checkpoint_files(folder):
    """{file name: bytes} of a checkpoint folder, state.json without its wall-clock time."""
    found = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        if name == "state.json":
            state = json.loads(data)
            state.pop("time")
            data = json.dumps(state, sort_keys=True).encode()
        if name == "COMPLETE":      # the manifest: the checksums of the files compared here, state.json's time too
            manifest = json.loads(data)["files"]
            manifest.pop("state.json")
            data = json.dumps(manifest, sort_keys=True).encode()
        found[name] = data
    return found


def _losses(out):
    with open(os.path.join(str(out), "train_log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r.get("loss") is not None]


@pytest.fixture(scope="module")
def one_host_pfc(hosts):
    """Partial FC, 6 steps on one host with 4 ranks (checkpoints at steps 3 and 6): the reference."""
    cluster, root = hosts
    out = root / "pfc_one_host"
    job = run(cluster, str(root / "job_one_host"), 4, "localhost:4", _pfc_argv(out, "--max-steps", "6"))
    assert job.rc == 0, job.output
    return out


@pytest.mark.parametrize("split", [(2, 2), (1, 3)])
def test_pfc_on_two_hosts_equals_one_host_bit_for_bit(hosts, one_host_pfc, split):
    cluster, root = hosts
    out = root / ("pfc_%d_%d" % split)
    job = run(cluster, str(root / ("job_%d_%d" % split)), 4, "%s:%d,%s:%d" % (A, split[0], B, split[1]),
              _pfc_argv(out, "--max-steps", "6"))
    assert job.rc == 0, job.output
    # where Horovod put each rank: the first split[0] ranks on A, started through A's sshd, local ranks 0.. per host
    assert sorted(job.reports) == [0, 1, 2, 3], job.output
    for rank, found in job.reports.items():
        host, local_rank = (A, rank) if rank < split[0] else (B, rank - split[0])
        assert (found["host"], found["local_rank"], found["local_size"]) == (
            host, local_rank, split[0] if host == A else split[1]), found
        assert found["ssh_connection"].split()[2:] == [host, str(cluster.port)], found
        assert found["gloo_iface"] == found["nccl_iface"] == "lo", found         # --network-interface lo
        # --ctx auto follows the local rank: 2 GPUs a host give gpu(0), gpu(1) on each host; 1 GPU, an error
        assert found["devices"]["2"] == ("gpu(%d)" % local_rank if local_rank < 2 else
                                         "error: local rank %d has no GPU of its own: MXNet sees 2 GPU(s) on this "
                                         "host; start at most 2 ranks per host (horovodrun -H host:2)" % local_rank)
        one_gpu = found["devices"]["1"]
        if local_rank == 0:
            assert one_gpu == "gpu(0)", found
        else:
            assert one_gpu.startswith("error: local rank %d has no GPU of its own: MXNet sees 1 GPU(s)" % local_rank)
    assert _losses(out) == _losses(one_host_pfc) and len(_losses(out)) == 6
    for step in ("step_000000003", "step_000000006"):
        got = _checkpoint_files(os.path.join(str(out), "checkpoints", step))
        want = _checkpoint_files(os.path.join(str(one_host_pfc), "checkpoints", step))
        assert sorted(got) == sorted(want) and len([n for n in got if n.startswith("centres_")]) == 8
        for name in want:
            assert got[name] == want[name], "%s/%s differs from the one-host run" % (step, name)
    assert not [n for n in os.listdir(str(out)) if n.startswith(".startup-check")]


def test_ffc_on_two_hosts_a_lost_host_ends_the_job_and_resume_finishes_on_the_other(hosts, faces):
    cluster, root = hosts
    out = root / "ffc"
    checkpoints = os.path.join(str(out), "checkpoints")
    argv = FFC_FLAGS + ["--data-dir", faces, "--output", str(out), "--checkpoint-every", "2", "--num-epochs", "1000"]
    proc = launch(cluster, str(root / "job_ffc"), 4, "%s:2,%s:2" % (A, B), argv)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(checkpoints) and checkpoint_io.latest_complete(checkpoints, "step_*"):
                break
            time.sleep(0.2)
        assert proc.poll() is None and checkpoint_io.latest_complete(checkpoints, "step_*"), "no checkpoint came"
        assert len(_ranks_on(cluster.hosts[B])) == 2
        cluster.hosts[B].kill_sessions()                 # host B is gone: its ranks and its ssh sessions
        lost = time.time()
        rc = proc.wait(timeout=60)
        ended = time.time() - lost
        deadline = time.time() + 10
        while _ranks_on(cluster.hosts[A]) and time.time() < deadline:
            time.sleep(0.2)
        left_on_a = _ranks_on(cluster.hosts[A])
        left_after = time.time() - lost
    finally:
        job = finish(cluster, proc)
    assert rc != 0, job.output
    assert ended < 15, "the job took %.1f s to end after host B was lost" % ended
    assert not left_on_a, "host A's ranks still ran %.1f s after host B was lost" % left_after
    assert sorted(r["host"] for r in job.reports.values()) == [A, A, B, B]
    saved = checkpoint_io.latest_complete(checkpoints, "step_*")
    state = json.load(open(os.path.join(saved, "state.json")))
    assert state["method"] == "ffc" and state["world_size"] == 4 and state["step"] % 2 == 0
    step = state["step"]
    resumed = run(cluster, str(root / "job_ffc_resume"), 2, "%s:2" % A, argv + ["--max-steps", str(step + 2),
                                                                                "--resume"])
    assert resumed.rc == 0, resumed.output
    assert resumed.rank_lines(0, "resumed from %s (step %d, written by 4 rank(s), now 2)" % (saved, step)), \
        resumed.output
    assert sorted(r["host"] for r in resumed.reports.values()) == [A, A]
    final = json.load(open(os.path.join(checkpoints, "step_%09d" % (step + 2), "state.json")))
    assert (final["step"], final["world_size"]) == (step + 2, 2)
    losses = _losses(out)
    assert len(losses) >= step + 2 and all(0 < loss < 1e3 for loss in losses[-2:]), losses
    print("host B lost after step %d: the job ended %.1f s later, host A's ranks %.1f s later; resumed on %s with 2 "
          "ranks" % (step, ended, left_after, A))


def _ranks_on(host):
    """Rank processes (the python of rank_train.py) started through ``host``'s sshd."""
    ranks = []
    for pid in host.sessions():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0] == sys.executable.encode() and RANK_MAIN.encode() in argv:
            ranks.append(pid)
    return ranks


@needs_namespaces
def test_an_output_folder_host_b_does_not_share_stops_every_rank_at_start(hosts):
    cluster, root = hosts
    out = root / "b_hidden" / "out"
    job = run(cluster, str(root / "job_unshared"), 2, "%s:1,%s:1" % (A, B), _pfc_argv(out, "--max-steps", "3"))
    assert job.rc != 0
    expected = ("the shared output folder check failed on host %s (rank 1): FileNotFoundError: the output folder %s is "
                "not the one rank 0 sees on host %s (the folder does not exist there)" % (B, out, A))
    for rank in (0, 1):
        assert job.rank_lines(rank, "train.py: error (rank %d, host %s): %s" % (rank, (A, B)[rank], expected)), \
            job.output
    assert not os.path.exists(os.path.join(str(out), "train_log.jsonl"))          # no step was trained
    assert not [n for n in os.listdir(str(out)) if n.startswith(".startup-check")]


@needs_namespaces
def test_data_files_host_b_cannot_read_stop_every_rank_at_start(hosts, faces):
    cluster, root = hosts
    data = root / "b_hidden"                            # host B sees an empty folder there
    job = run(cluster, str(root / "job_no_data"), 2, "%s:1,%s:1" % (A, B),
              ["--dataset", "synthetic", "--data-dir", str(data), "--batch-size", "4", "--output",
               str(root / "out_no_data"), "--max-steps", "3"])
    assert job.rc != 0
    # host B cannot read the data folder's property file (read while the configuration is resolved): its rank
    # says so, and the other rank names host B and the file
    missing = "property file not found: %s" % (data / "property")
    assert job.rank_lines(1, "train.py: error (host %s): %s" % (B, missing)), job.output
    assert job.rank_lines(0, "train.py: error (host %s): reading the configuration failed on host %s (rank 1): "
                          "ValueError: %s" % (A, B, missing)), job.output
    assert not os.path.exists(os.path.join(str(root / "out_no_data"), "train_log.jsonl"))
