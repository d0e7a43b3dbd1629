"""The multi-rank harness itself: real horovodrun jobs, failures and hangs are reported, never waited on."""
import time

import numpy as np
import pytest

from tests.harness import RankFailure, run_ranks


def collectives_body(rows_per_rank_base):
    import mxnet as mx
    import horovod.mxnet as hvd
    rank, size = hvd.rank(), hvd.size()
    summed = hvd.allreduce(mx.nd.full((4,), rank + 1.0), average=False, name="sum")
    # ragged allgather: rank r contributes r + base rows, int64 values above 2**24 stay exact
    rows = rows_per_rank_base + rank
    local = np.arange(rows, dtype=np.int64) + 2 ** 25 + 1000 * rank
    gathered = hvd.allgather(mx.nd.array(local, dtype="int64"), name="gather")
    return {"rank": rank, "size": size, "sum": summed.asnumpy(), "gathered": gathered.asnumpy()}


@pytest.mark.parametrize("np_", [1, 2, 3])
def test_allreduce_and_allgather(np_):
    results = run_ranks(collectives_body, np=np_, timeout=120, kwargs={"rows_per_rank_base": 2})
    expected_sum = sum(r + 1.0 for r in range(np_))
    expected_gather = np.concatenate([np.arange(2 + r, dtype=np.int64) + 2 ** 25 + 1000 * r for r in range(np_)])
    assert [r["rank"] for r in results] == list(range(np_))
    for r in results:
        assert r["size"] == np_
        np.testing.assert_array_equal(r["sum"], np.full(4, expected_sum, np.float32))
        assert r["gathered"].dtype == np.int64
        np.testing.assert_array_equal(r["gathered"], expected_gather)


def raising_body():
    import mxnet as mx
    import horovod.mxnet as hvd
    if hvd.rank() == 1:
        raise ValueError("rank one refuses")
    # rank 0 waits in a collective that rank 1 never joins
    hvd.allreduce(mx.nd.ones((1,)), name="never").wait_to_read()
    return "unreachable"


def test_raising_rank_fails_the_job_with_its_message():
    start = time.time()
    with pytest.raises(RankFailure) as err:
        run_ranks(raising_body, np=2, timeout=90)
    assert "rank one refuses" in str(err.value)
    assert time.time() - start < 90


def hanging_body():
    import time as _time
    import horovod.mxnet as hvd
    if hvd.rank() == 0:
        _time.sleep(3600)
    return hvd.rank()


def test_hanging_rank_is_killed_at_the_timeout():
    start = time.time()
    with pytest.raises(RankFailure) as err:
        run_ranks(hanging_body, np=2, timeout=15)
    elapsed = time.time() - start
    assert "timed out" in str(err.value)
    assert elapsed < 40, elapsed


def test_body_must_be_module_level():
    def local_body():
        return 0
    with pytest.raises(ValueError, match="module-level"):
        run_ranks(local_body, np=1)
