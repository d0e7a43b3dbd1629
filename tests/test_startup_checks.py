"""Start-up checks: the shared output folder check and errors agreed across ranks, on one process and on two
ranks whose hosts are told apart by HOROVOD_HOSTNAME (as horovodrun sets it). tests/multihost/ runs the same
checks on two real ssh hosts, one of them with its own view of the file system."""
import os

import numpy as np
import pytest

from tests.harness import run_ranks


def test_failures_are_grouped_by_host_and_error():
    from recognition.dist import describe_failures
    reports = ["", "", "OSError: x missing", "OSError: x missing", "ValueError: bad", "OSError: x missing"]
    hosts = ["a", "a", "b", "b", "c", "d"]
    assert describe_failures(reports, hosts) == ("on host b (ranks 2, 3) and host d (rank 5): OSError: x missing; "
                                                 "on host c (rank 4): ValueError: bad")


def test_one_process_checks_nothing_and_reports_its_own_error(tmp_path, monkeypatch):
    import horovod.mxnet as hvd
    hvd.init()
    from recognition import dist, startup_checks
    monkeypatch.setenv("HOROVOD_HOSTNAME", "here")
    startup_checks.check_shared_output(str(tmp_path / "out"))
    assert not os.path.exists(str(tmp_path / "out"))           # one process: nothing to compare, nothing written
    assert dist.on_every_rank(lambda: 7, "seven") == 7

    def missing():
        raise FileNotFoundError("training data file not found: /data/train_iter.rec")
    with pytest.raises(dist.AgreedError) as caught:
        dist.on_every_rank(missing, "reading")
    assert str(caught.value) == ("reading failed on host here (rank 0): FileNotFoundError: training data file not "
                                 "found: /data/train_iter.rec")
    assert isinstance(caught.value, ValueError)                 # train.py prints it as a plain error

    def bug():
        raise TypeError("a bug, not an input error")
    with pytest.raises(TypeError):                              # its own traceback, not a tidy message
        dist.on_every_rank(bug, "reading")


def check_body(scenarios, hosts=("host-a", "host-b")):
    """For each scenario (folders, fail_on, error): rank r runs the output check on ``folders[r]`` (another folder
    stands for another host's view of the path) and an action that fails on rank ``fail_on``; returns what each
    check raised and proves after each that the ranks still meet in a collective (none was left behind)."""
    import horovod.mxnet as hvd
    from recognition import dist, startup_checks
    rank = hvd.rank()
    os.environ["HOROVOD_HOSTNAME"] = hosts[rank]
    results = []
    for i, (folders, fail_on, error) in enumerate(scenarios):
        out = {}
        try:
            startup_checks.check_shared_output(folders[rank], wait=0.3)
            out["shared"] = None
        except dist.AgreedError as err:
            out["shared"] = str(err)
        dist.barrier("listed%d" % i)            # rank 0 removes its marker once every rank has checked
        out["listing"] = sorted(os.listdir(folders[rank])) if os.path.isdir(folders[rank]) else None

        def action():
            if rank == fail_on:
                if error == "TypeError":
                    raise TypeError("a bug on rank %d" % rank)
                raise FileNotFoundError("training data file not found: /data/train_iter.rec")
            return rank * 10
        try:
            out["agreed"] = dist.on_every_rank(action, "building the method")
        except dist.AgreedError as err:
            out["agreed"] = "AgreedError: " + str(err)
        except TypeError as err:
            out["agreed"] = "TypeError: " + str(err)
        out["after"] = float(dist.allreduce(np.array([rank + 1.0]), name="after%d" % i)[0])
        results.append(out)
    return results


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One 2-rank job, three scenarios: a shared folder; rank 1 sees another folder and fails to read data; rank 1
    finds no folder at all and rank 0 has a bug."""
    root = tmp_path_factory.mktemp("startup")
    (root / "b_view").mkdir()
    scenarios = [([str(root / "shared")] * 2, None, None),
                 ([str(root / "out"), str(root / "b_view")], 1, "OSError"),
                 ([str(root / "out2"), str(root / "nowhere")], 0, "TypeError")]
    results = run_ranks(check_body, np=2, timeout=180, kwargs={"scenarios": scenarios})
    return root, list(zip(*results))          # per scenario: (rank 0's, rank 1's)


def test_two_ranks_that_share_the_folder_pass_and_leave_nothing_behind(checked):
    _, (shared, _, _) = checked
    assert [r["shared"] for r in shared] == [None, None]
    assert [r["listing"] for r in shared] == [[], []]          # rank 0 made it; the marker is gone
    assert [r["agreed"] for r in shared] == [0, 10] and [r["after"] for r in shared] == [3.0, 3.0]


def test_a_rank_seeing_another_folder_stops_every_rank_with_one_error(checked):
    root, (_, other, _) = checked
    message = other[0]["shared"]
    assert message == other[1]["shared"]
    assert message.startswith("the shared output folder check failed on host host-b (rank 1): FileNotFoundError: "
                              "the output folder %s is not the one rank 0 sees on host host-a (the folder there is "
                              "another one: it lacks the marker file " % (root / "b_view"))
    assert "every rank writes its centre shard" in message
    assert other[0]["listing"] == [] and other[1]["listing"] == []       # no marker or probe left
    # data errors: the same message on both ranks, naming the failing host and the file; no rank left behind
    assert other[0]["agreed"] == other[1]["agreed"] == (
        "AgreedError: building the method failed on host host-b (rank 1): FileNotFoundError: training data file not "
        "found: /data/train_iter.rec")
    assert [r["after"] for r in other] == [3.0, 3.0]


def test_a_missing_folder_and_a_bug_are_named_too(checked):
    _, (_, _, missing) = checked
    assert missing[0]["shared"] == missing[1]["shared"]
    assert "on host host-b (rank 1)" in missing[0]["shared"]
    assert "(the folder does not exist there)" in missing[0]["shared"]
    # the failing rank keeps its own exception (a bug shows its traceback); the other is told what happened
    assert missing[0]["agreed"] == "TypeError: a bug on rank 0"
    assert missing[1]["agreed"] == ("AgreedError: building the method failed on host host-a (rank 0): TypeError: "
                                    "a bug on rank 0")
    assert [r["after"] for r in missing] == [3.0, 3.0]


def trainer_body(outputs, data_dirs):
    """Trainer start-up with rank r's output folder and data folder: what each rank raised."""
    import horovod.mxnet as hvd
    from tests.conftest import TINY_TRAIN_FLAGS as COMMON, patch_backbone
    patch_backbone()
    from recognition.config import config_from_args
    from recognition.dist import AgreedError as StartupError
    from recognition.trainer import Trainer
    rank = hvd.rank()
    os.environ["HOROVOD_HOSTNAME"] = "host-%d" % rank
    raised = []
    for argv in (COMMON + ["--output", outputs[rank]],
                 ["--dataset", "synthetic", "--data-dir", data_dirs[rank], "--batch-size", "4",
                  "--output", outputs[0]]):
        try:
            Trainer(config_from_args(argv))
            raised.append(None)
        except StartupError as err:
            raised.append(str(err))
    return raised


def test_the_trainer_checks_before_it_builds_anything(tmp_path):
    data = tmp_path / "data"
    data.mkdir()                                   # a data folder without its files (e.g. a host's empty mount)
    from recognition.data.rec_format import write_property
    write_property(str(data / "property"), 10, (112, 112))
    (tmp_path / "b").mkdir()
    results = run_ranks(trainer_body, np=2, timeout=180,
                        kwargs={"outputs": [str(tmp_path / "a"), str(tmp_path / "b")], "data_dirs": [
                            str(tmp_path / "data"), str(tmp_path / "data")]})
    output_error, data_error = results[0]
    assert results[1] == results[0]
    assert output_error.startswith("the shared output folder check failed on host host-1 (rank 1)")
    assert str(tmp_path / "b") in output_error
    assert data_error.startswith("building the pfc method (its data readers) failed on host host-0 (rank 0) and "
                                 "host host-1 (rank 1): FileNotFoundError: training data file not found: %s"
                                 % (data / "train_iter.rec"))
