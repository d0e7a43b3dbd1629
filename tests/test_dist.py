"""recognition/dist.py: collectives of Python objects, and the agreement that keeps a failure on one rank from
leaving the others waiting in a collective."""
from tests.harness import run_ranks


def objects_body():
    import horovod.mxnet as hvd
    from recognition import dist
    rank = hvd.rank()
    return dist.allgather_object({"rank": rank, "text": "x" * (rank * 1000), "array": list(range(rank))}, "objs")


def test_allgather_object_returns_every_ranks_object_in_rank_order():
    results = run_ranks(objects_body, np=3, timeout=120)
    expected = [{"rank": r, "text": "x" * (r * 1000), "array": list(range(r))} for r in range(3)]
    assert results == [expected] * 3


def one_rank_fails_body():
    """Rank 1 cannot read its file: every rank must raise, none may wait in a later collective."""
    import horovod.mxnet as hvd
    from recognition import dist
    released = []

    def action():
        if hvd.rank() == 1:
            raise FileNotFoundError("rank 1 cannot see the checkpoint")
        return "loaded"
    try:
        outcome = dist.on_every_rank(action, "backbone", cleanup=released.append)
    except (ValueError, OSError) as err:
        outcome = "%s: %s" % (type(err).__name__, err)
    dist.barrier("after")          # every rank reaches the next collective: nobody is stuck
    return outcome, released, dist.host_name()


def test_a_failure_on_one_rank_stops_every_rank_with_its_message():
    results = run_ranks(one_rank_fails_body, np=2, timeout=120)
    host = results[1][2]                            # as horovodrun names it (HOROVOD_HOSTNAME)
    message = ("AgreedError: backbone failed on host %s (rank 1): FileNotFoundError: rank 1 cannot see the "
               "checkpoint" % host)
    assert results[0][:2] == (message, ["loaded"])      # what rank 0 built was released
    assert results[1][:2] == (message, [])


def all_fine_body():
    from recognition import dist
    import horovod.mxnet as hvd
    return dist.on_every_rank(lambda: hvd.rank() * 10, "fine")


def test_success_everywhere_returns_each_ranks_result():
    assert run_ranks(all_fine_body, np=2, timeout=120) == [0, 10]
