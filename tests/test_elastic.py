"""train.py --elastic under horovodrun's elastic driver, for both methods, with a discovery script the test controls.

One job per method: 3 ranks (hosts localhost, 127.0.0.1, 127.1 with one slot each: Horovod drops the whole host of
a failed worker), rank R SIGKILLs itself before step 8; the two others go on from the commit of step 6; the test
then lists a 4th host (127.0.1) and the job grows back to 3 at the commit of step 12 (rank 0 holds that commit
until the driver has told it: ``tests/elastic_worker.py``), and ends at step 18. Its final checkpoint must equal,
bit for bit, that of a run that stops and resumes at the same steps: 3 ranks to step 6, 2 ranks to step 12,
3 ranks to step 18 (the comparison runs beside the elastic job, which spends most of its time waiting). At the end
no worker process may be left, nor a thread in any worker.
"""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.harness import ROOT, horovodrun_path, run_ranks
from tests.test_golden_runs import write_faces

STEPS, COMMIT_EVERY, KILL_BEFORE, GROW_AT = 18, 3, 7, 12   # the kill before step 8 sends the run back to step 6
WORLDS = [(0, 3), (6, 2), (12, 3)]                          # (first step, ranks) of every world the job trains on
ENV = {"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1", "PYTHONUNBUFFERED": "1",
       "HOROVOD_FUSION_THRESHOLD": "0"}        # fused sums of 3 ranks depend on timing (README "Multiple hosts")
FLAGS = {
    "pfc": ["--dataset", "bench_1m", "--num-classes", "203", "--embedding-size", "16", "--batch-size", "4",
            "--sample-ratio", "0.5", "--bank-pipeline", "--loss-scale", "dynamic", "--num-epochs", "2"],
    "ffc": ["--dataset", "synthetic_ffc", "--queue-size", "6", "--embedding-size", "16", "--batch-size", "2",
            "--num-epochs", "20", "--preprocess-threads", "1", "--val-targets", ""],
}
COMMON = ["--lr", "0.2", "--frequent", "1", "--verbose", "0", "--checkpoint-every", str(COMMIT_EVERY)]


def train_body(argv):
    """train.py's main on this rank with the tiny backbone; its exit code."""
    from tests.conftest import patch_backbone
    patch_backbone()
    from recognition.train import main
    return main(argv)


def _stop_and_resume(argv, out, errors):
    """The comparison: every world of WORLDS as a run of its own, each resuming from the last one's checkpoint."""
    try:
        for i, (start, ranks) in enumerate(WORLDS):
            end = WORLDS[i + 1][0] if i + 1 < len(WORLDS) else STEPS
            leg = argv + ["--output", out, "--max-steps", str(end)] + (["--resume"] if start else [])
            codes = run_ranks(train_body, np=ranks, timeout=240, kwargs={"argv": leg}, env=ENV)
            assert codes == [0] * ranks, codes
    except BaseException as err:     # noqa: BLE001 - reported by the test's thread
        errors.append(err)


def _events(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def _contents(folder):
    """{file: what it holds} of a checkpoint folder (arrays as NumPy; state.json without its time)."""
    from recognition import checkpoint_io
    out = {}
    for name in checkpoint_io.folder_files(folder):
        path = os.path.join(folder, name)
        if name.endswith(".params"):
            arg, aux = checkpoint_io.load_params(path)
            out[name] = {k: v.asnumpy() for k, v in list(arg.items()) + list(("aux:" + k, v) for k, v in aux.items())}
        elif name.endswith(".npy"):
            out[name] = np.load(path)
        elif name.endswith(".npz"):
            with np.load(path) as data:
                out[name] = {k: data[k] for k in data.files}
        elif name.endswith(".json"):
            with open(path) as f:
                out[name] = json.load(f)
            out[name].pop("time", None)
        else:
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def _assert_same(got, want, where=""):
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            _assert_same(got[key], want[key], "%s/%s" % (where, key))
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, err_msg=where)
        assert got.dtype == want.dtype, where
    else:
        assert got == want, where


def _leftovers(marker):
    """Live processes whose command line holds ``marker`` (this test's folder)."""
    import psutil
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append((proc.info["pid"], " ".join(proc.info["cmdline"])[:200]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _discovery(tmp):
    """4 names of this machine (the 4th is the host the test adds), the hosts file listing the first 3 and the
    discovery script that prints it."""
    from tools.elastic_probe_scenario import local_host_names, write_hosts
    names = local_host_names(4)
    hosts, discover = os.path.join(tmp, "hosts"), os.path.join(tmp, "discover.sh")
    write_hosts(hosts, names[:3])
    with open(discover, "w") as f:
        f.write("#!/bin/sh\ncat %s\n" % hosts)
    os.chmod(discover, 0o755)
    return names, hosts, discover


def _elastic_job(cmd, env, out, names, hosts, comparison, batch):
    """Run the job; list the 4th host once the world of 2 has passed its commit before GROW_AT (and the comparison
    no longer takes the CPU a new worker needs to reach hvd.init() within Gloo's timeout). (exit code, output)."""
    from tools.elastic_probe_scenario import write_hosts
    log_path, began, grown = os.path.join(os.path.dirname(out), "horovodrun.log"), time.time(), False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and time.time() - began < 420:
                time.sleep(0.2)
                events = _events(os.path.join(out, "train_log.jsonl"))
                starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
                on_two = events[starts[-1] + 1:] if starts and events[starts[-1]]["batch_size_global"] == 2 * batch \
                    else []
                if not grown and not comparison.is_alive() and any(e.get("step", 0) > GROW_AT - COMMIT_EVERY
                                                                   for e in on_two):
                    write_hosts(hosts, names[:4])
                    grown = True
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait()
    with open(log_path, errors="replace") as f:
        return proc.returncode, f.read()


@pytest.mark.parametrize("method,kill_rank", [("pfc", 0), ("ffc", 1)])
def test_a_lost_rank_and_an_added_host_equal_a_run_stopped_and_resumed_there(method, kill_rank, tmp_path):
    tmp = str(tmp_path)
    argv = FLAGS[method] + COMMON
    if method == "ffc":
        os.makedirs(os.path.join(tmp, "data"))
        write_faces(os.path.join(tmp, "data"))
        argv += ["--data-dir", os.path.join(tmp, "data")]
    errors = []
    comparison = threading.Thread(target=_stop_and_resume, args=(argv, os.path.join(tmp, "resumed"), errors))
    comparison.start()
    names, hosts, discover = _discovery(tmp)
    out, report = os.path.join(tmp, "elastic"), os.path.join(tmp, "report")
    os.makedirs(report)
    cmd = [horovodrun_path(), "--gloo", "-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script",
           discover, "--network-interface", "lo", sys.executable, os.path.join(ROOT, "tests", "elastic_worker.py")]
    cmd += argv + ["--output", out, "--max-steps", str(STEPS), "--elastic", "--commit-every", str(COMMIT_EVERY)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **ENV,
               ELASTIC_TEST_KILL="%d,%d" % (kill_rank, KILL_BEFORE), ELASTIC_TEST_GROW_AT=str(GROW_AT),
               ELASTIC_TEST_REPORT=report)
    batch = int(argv[argv.index("--batch-size") + 1])
    try:
        code, output = _elastic_job(cmd, env, out, names, hosts, comparison, batch)
        comparison.join()
        assert not errors, errors
        assert code == 0, "elastic job exit code %s; output:\n%s" % (code, output[-20000:])
        # every world the job trained on, from the progress log's start records (global batch = ranks x batch)
        worlds = [(e["step"], e["batch_size_global"] // batch)
                  for e in _events(os.path.join(out, "train_log.jsonl")) if e.get("event") == "start"]
        assert worlds == WORLDS, worlds
        assert "elastic: 2 rank(s) on 2 host(s) continue from the commit of step 6 (epoch 0" in output
        assert "step 7 is trained again" in output
        # the same final state as the run that stopped and resumed at the same steps
        final = "checkpoints/step_%09d" % STEPS
        _assert_same(_contents(os.path.join(out, final)), _contents(os.path.join(tmp, "resumed", final)), final)
        # the 3 processes of the last world, the added host's among them, ended with 0 and no thread of their own
        reports = []
        for name in os.listdir(report):
            with open(os.path.join(report, name)) as f:
                reports.append(json.load(f))
        assert sorted(r["host"] for r in reports) == sorted(set(r["host"] for r in reports)), reports
        assert len(reports) == 3 and names[3] in [r["host"] for r in reports], reports
        assert all(r["code"] == 0 and r["threads"] == [] for r in reports), reports
        deadline = time.time() + 10
        while _leftovers(tmp) and time.time() < deadline:
            time.sleep(0.5)
        assert _leftovers(tmp) == []
    finally:        # a job that failed may leave workers behind (horovodrun starts them in sessions of their own)
        comparison.join()
        for pid, _ in _leftovers(tmp):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------- in-process unit tests
def test_only_a_lost_rank_is_recovered():
    import mxnet as mx
    from recognition.elastic import lost_rank
    shut = mx.base.MXNetError("MXNetError: Horovod has been shut down. This was caused by an exception on one of the "
                              "ranks or an attempt to allreduce ...")
    assert lost_rank(shut)
    try:                                  # wrapped by our own code (dist.on_every_rank raises from it)
        try:
            raise shut
        except mx.base.MXNetError as err:
            raise ValueError("reading the configuration failed") from err
    except ValueError as wrapped:
        assert lost_rank(wrapped)
    assert not lost_rank(mx.base.MXNetError("Check failed: shape mismatch"))     # a bug: its worker dies
    assert not lost_rank(RuntimeError("Horovod has been shut down"))


def test_elastic_needs_horovodruns_elastic_driver_and_the_driver_needs_elastic():
    from recognition.elastic import check_launcher
    check_launcher(True, {"HOROVOD_ELASTIC": "1"})
    check_launcher(False, {})
    with pytest.raises(ValueError, match="--elastic runs under horovodrun's elastic driver"):
        check_launcher(True, {})
    with pytest.raises(ValueError, match="pass --elastic"):
        check_launcher(False, {"HOROVOD_ELASTIC": "1"})


def test_train_py_refuses_elastic_without_the_driver(tmp_path, monkeypatch, capsys, tiny_backbone):
    from recognition.train import main
    from tests.conftest import tiny_train_argv
    monkeypatch.delenv("HOROVOD_ELASTIC", raising=False)
    assert main(tiny_train_argv(tmp_path / "run", "--elastic")) == 2
    assert "--elastic runs under horovodrun's elastic driver" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_elastic_flags():
    from recognition.config import config_from_args
    cfg = config_from_args(["--dataset", "bench_1m", "--elastic", "--commit-every", "25"])
    assert (cfg.elastic, cfg.commit_every) == (True, 25)
    assert config_from_args(["--dataset", "bench_1m"]).elastic is False
    with pytest.raises(ValueError, match="commit_every must be >= 1"):
        config_from_args(["--dataset", "bench_1m", "--elastic", "--commit-every", "0"])
    with pytest.raises(ValueError, match="--bank-location disk"):
        config_from_args(["--dataset", "bench_1m", "--elastic", "--bank-location", "disk"])


def test_the_restart_takes_the_newest_commit_any_rank_closed():
    from recognition.elastic import _newest_common

    def rank(committed, pending=None):
        steps = [s for s in (committed, pending) if s is not None]
        return {"committed": committed, "steps": steps}
    assert _newest_common([rank(None), rank(None, 0)]) == (None, None)          # before the first commit closed
    assert _newest_common([rank(6), rank(6)]) == (6, 0)
    # rank 1 closed 9; rank 0 failed before the closing allreduce and holds 9 as pending: 9, from rank 0
    assert _newest_common([rank(6, 9), rank(9), {"committed": None, "steps": []}]) == (9, 0)
    assert _newest_common([{"committed": None, "steps": []}, rank(3, 6), rank(3, 6)]) == (3, 1)


def test_rows_lost_with_their_copy_stop_the_run_with_the_resume_advice():
    import horovod.mxnet as hvd
    from easydict import EasyDict
    from recognition import elastic, elastic_rows
    hvd.init()
    state = elastic.ElasticState(EasyDict(method="pfc"))
    rows = {"weight": np.zeros((5, 2), np.float32)}
    state.committed = elastic.Commit(6, {"step": 6}, [("own", 0, 5, rows)])
    state.ranges = [(0, 10)]                 # a world of one that needs all 10 rows; rows 5-9 went with two ranks
    holdings = [{"committed": 6, "steps": [6], "pieces": [(6, "own", 0, 5)], "layout": elastic_rows.layout_of(rows),
                 "reached": 8, "host": "a"}]
    with pytest.raises(elastic.CommitLost, match=r"commit of step 6 cannot be restored on these 1 ranks: the pfc "
                                                 r"rows \[5, 10\) were held only by ranks that are gone.*--resume"):
        state._install(None, holdings, 6, 0)


@pytest.mark.parametrize("method", ["pfc", "ffc"])
def test_a_snapshot_in_a_new_trainer_continues_like_the_uninterrupted_run(method, tmp_path, tiny_backbone):
    """Trainer.snapshot / load_snapshot on one rank: 2 steps, a snapshot, a new trainer from it, 2 more steps give
    the checkpoint of 4 uninterrupted steps; the snapshot is host memory later steps do not change."""
    import horovod.mxnet as hvd
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    hvd.init()
    argv = FLAGS[method] + COMMON
    if method == "ffc":
        write_faces(str(tmp_path))
        argv += ["--data-dir", str(tmp_path)]
    config = lambda out, steps: config_from_args(argv + ["--output", str(tmp_path / out), "--max-steps", str(steps)])
    Trainer(config("straight", 4)).fit()
    snapshots = []
    Trainer(config("split", 3)).fit(after_step=lambda t: snapshots.append(t.snapshot()) if t.step == 2 else None)
    (snapshot,) = snapshots
    frozen = {k: v.copy() for k, v in snapshot.shared["arg"].items()}
    second = Trainer(config("split", 4), claim_output=False)
    second.load_snapshot(snapshot.shared, snapshot.rows)
    assert second.step == 2
    second.fit()
    final = "checkpoints/step_000000004"
    _assert_same(_contents(str(tmp_path / "split" / final)), _contents(str(tmp_path / "straight" / final)), final)
    _assert_same(snapshot.shared["arg"], frozen)          # the steps after the snapshot did not write into it
    if method == "pfc":
        assert sorted(snapshot.rows) == ["momentum", "weight"] and snapshot.rows["weight"].shape == (203, 16)
        assert snapshot.shared["loss_scale"] == {"scale": 2.0 ** 16, "good_steps": 2, "skipped": 0}
    else:
        assert snapshot.rows == {} and sorted(snapshot.shared["method"]["queue"]) == ["banks", "next_row", "slots"]
