"""Pipelined bank I/O: the parameters after several steps are bit-identical to the sequential mode, on 1 and 2
ranks, at ratio 0.1 and 1.0, with the device, host and disk banks; bank failures reach every rank."""
import time

import numpy as np
import pytest

from tests.harness import run_ranks

NUM_CLASSES, DIM, LOCAL_BATCH, STEPS = 240, 16, 8, 4
CASES = [(ratio, bank) for ratio in (0.1, 1.0) for bank in ("device", "host", "disk")]
PUSH_DELAY = 0.02     # seconds each push waits first: a pull that overtook it would read stale rows


def _batches(rank, steps):
    """Per-step (embeddings, labels) of this rank; labels from a few classes, so consecutive steps share rows."""
    rng = np.random.default_rng([7, rank])
    return [(rng.standard_normal((LOCAL_BATCH, DIM)).astype(np.float32),
             rng.integers(0, NUM_CLASSES // 8, LOCAL_BATCH) * 8) for _ in range(steps)]


def _slow_pushes(pfc):
    """Make every bank update start late (the race a missing ordering would lose); the NDArray kernels update
    through apply_grad, the CPU kernels through apply_scaled_grad."""
    for name in ("apply_grad", "apply_scaled_grad"):
        update = getattr(pfc.bank, name, None)
        if update is None:
            continue

        def late(*args, _update=update, **kwargs):
            time.sleep(PUSH_DELAY)
            return _update(*args, **kwargs)
        setattr(pfc.bank, name, late)


def _train(ratio, bank, pipelined, kernels="numpy", overtaking=False):
    """STEPS steps the way PartialFCMethod runs them; returns everything the comparison needs."""
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    from recognition.partial_fc.bank_queue import BankQueue
    pfc = PartialFC(NUM_CLASSES, DIM, sample_ratio=ratio, bank_location=bank, kernels=kernels, seed=5,
                    pipeline=pipelined)
    if pipelined:
        _slow_pushes(pfc)
    if overtaking:    # a broken queue: two workers, so a pull may run before the push queued ahead of it
        pfc._bank_jobs = BankQueue(threaded=True)
        from concurrent.futures import ThreadPoolExecutor
        pfc._bank_jobs._executor = ThreadPoolExecutor(max_workers=2)
    losses, grads, indices = [], [], []
    busy = mx.nd.ones((64, 64))
    for x, y in _batches(hvd.rank(), STEPS):
        labels = mx.nd.array(y, dtype="int64")
        if pipelined:
            pfc.prepare(labels)
        mx.nd.dot(busy, busy).wait_to_read()        # stands for the backbone's forward
        loss, grad = pfc.forward_backward(mx.nd.array(x), labels)
        indices.append(np.asarray(pfc.sampled_index).copy())
        pfc.update(0.1)
        losses.append(loss)
        grads.append(grad.asnumpy())
    out = dict(losses=losses, grads=grads, indices=indices, weight=pfc.weight.copy(), momentum=pfc.weight_mom.copy())
    pfc.close()
    return out


def _failing_bank(fail_rank):
    """Two pipelined steps where fail_rank's bank cannot write; returns the errors every call raised."""
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    pfc = PartialFC(NUM_CLASSES, DIM, sample_ratio=0.1, bank_location="disk", seed=5, pipeline=True)
    if hvd.rank() == fail_rank:
        def full_disk(*args, **kwargs):
            raise OSError("No space left on device (injected)")
        pfc.bank.apply_grad = pfc.bank.apply_scaled_grad = full_disk
    errors = []
    for x, y in _batches(hvd.rank(), 2):
        labels = mx.nd.array(y, dtype="int64")
        try:
            pfc.prepare(labels)
            pfc.forward_backward(mx.nd.array(x), labels)
            pfc.update(0.1)        # queued: fails on the bank thread of fail_rank
        except RuntimeError as err:
            errors.append(str(err))
    try:
        pfc.flush(agree=True)
        errors.append(None)
    except Exception as err:    # noqa: BLE001
        errors.append(str(err))
    return errors


def _changed_labels():
    """A bad label at prepare() (rank 0), then labels that differ from the prepared ones (rank 1)."""
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    pfc = PartialFC(NUM_CLASSES, DIM, sample_ratio=0.1, seed=5, pipeline=True)
    (x, y), = _batches(hvd.rank(), 1)
    messages = []
    try:
        pfc.prepare(mx.nd.array(np.full(LOCAL_BATCH, NUM_CLASSES) if hvd.rank() == 0 else y, dtype="int64"))
        messages.append(None)
    except ValueError as err:
        messages.append(str(err))
    pfc.prepare(mx.nd.array(y, dtype="int64"))
    try:
        pfc.forward_backward(mx.nd.array(x), mx.nd.array(y + 1 if hvd.rank() == 1 else y, dtype="int64"))
        messages.append(None)
    except ValueError as err:
        messages.append(str(err))
    pfc.close()
    return messages


def one_rank_body():
    return {"cases": [(_train(r, b, pipelined=False), _train(r, b, pipelined=True)) for r, b in CASES],
            "overtaking": (_train(0.1, "host", pipelined=False), _train(0.1, "host", pipelined=True, overtaking=True))}


def two_rank_body():
    return {"cases": [(_train(r, b, pipelined=False), _train(r, b, pipelined=True)) for r, b in CASES],
            "ndarray": tuple(_train(0.1, "device", mode, kernels="ndarray") for mode in (False, True)),
            "failing": _failing_bank(fail_rank=1), "labels": _changed_labels()}


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(one_rank_body, np=1, timeout=240)


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(two_rank_body, np=2, timeout=300)


def _assert_identical(sequential, pipelined):
    assert pipelined["losses"] == sequential["losses"]
    for a, b in zip(pipelined["grads"], sequential["grads"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pipelined["weight"], sequential["weight"])
    np.testing.assert_array_equal(pipelined["momentum"], sequential["momentum"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_pipelined_parameters_are_bit_identical_to_sequential(world_size, request):
    results = request.getfixturevalue("one_rank" if world_size == 1 else "two_ranks")
    for per_rank in results:
        for (ratio, bank), (sequential, pipelined) in zip(CASES, per_rank["cases"]):
            # consecutive steps share sampled rows, so the order of push t and pull t+1 matters
            shared = [np.intersect1d(a, b).size for a, b in zip(sequential["indices"], sequential["indices"][1:])]
            assert min(shared) > 0, (ratio, bank, shared)
            assert np.any(sequential["momentum"]), "no update happened"
            _assert_identical(sequential, pipelined)


def test_the_comparison_catches_a_pull_that_overtakes_its_push(one_rank):
    """Control: with the pulls allowed to run before the queued push, the parameters do change."""
    sequential, broken = one_rank[0]["overtaking"]
    assert not np.array_equal(broken["weight"], sequential["weight"])


def test_pipelined_ndarray_kernels_are_bit_identical_too(two_ranks):
    for per_rank in two_ranks:
        _assert_identical(*per_rank["ndarray"])


def test_a_failed_push_is_reported_on_every_rank_without_a_hang(two_ranks):
    for rank, per_rank in enumerate(two_ranks):
        errors = per_rank["failing"]
        assert len(errors) == 2, errors        # step 2's forward_backward, then flush: nobody hung
        assert "step 1 cannot run: rank 1's memory bank failed" in errors[0]
        assert ("No space left on device" in errors[0]) == (rank == 1)
        assert errors[1] is not None


def test_bad_or_changed_labels_raise_the_same_error_on_every_rank(two_ranks):
    first, second = (per_rank["labels"] for per_rank in two_ranks)
    assert first == second
    assert "rank 0 batch row" in first[0] and "has label 240 outside [0, 240)" in first[0]
    assert "rank 1 passed labels that differ from the ones it gave prepare()" in first[1]
