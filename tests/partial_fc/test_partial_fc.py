"""The Partial FC operator on 1, 2 and 3 ranks against a dense single-process NumPy reference."""
import numpy as np
import pytest

from tests.harness import run_ranks
from tests.partial_fc.pfc_reference import dense_reference

NUM_CLASSES, DIM, LOCAL_BATCH = 1000, 32, 8     # 1000 is not divisible by 3: shards 334/333/333
ARC, COS = (1.0, 0.5, 0.0), (1.0, 0.0, 0.4)
CASES = [  # (sample_ratio, margins, interclass_filter, kernels, bank_location)
    (1.0, ARC, 0.0, "numpy", "device"),
    (1.0, COS, 0.0, "numpy", "device"),
    (0.1, ARC, 0.0, "numpy", "device"),
    (0.1, COS, 0.0, "numpy", "host"),
    (0.1, ARC, 0.2, "numpy", "device"),
    (0.1, ARC, 0.0, "numpy", "disk"),
    (1.0, ARC, 0.0, "ndarray", "device"),
    (0.1, COS, 0.2, "ndarray", "device"),
    (0.1, ARC, 0.0, "ndarray", "host"),
]


def global_batch(world_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((world_size * LOCAL_BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, world_size * LOCAL_BATCH)
    y[:3] = y[3]  # a repeated label in the batch
    return x, y


def exactness_body(cases):
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    rank, size = hvd.rank(), hvd.size()
    x, y = global_batch(size)
    own = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out = []
    for ratio, margins, filt, kernels, bank in cases:
        pfc = PartialFC(NUM_CLASSES, DIM, sample_ratio=ratio, margins=margins, interclass_filter=filt,
                        kernels=kernels, bank_location=bank, seed=0)
        w0, m0 = pfc.weight.copy(), pfc.weight_mom.copy()
        loss, grad = pfc.forward_backward(mx.nd.array(x[own]), mx.nd.array(y[own], dtype="int64"))
        index = np.asarray(pfc.sampled_index).copy()
        dw = pfc.sampled_weight_grad()
        pfc.update(0.1)
        out.append(dict(loss=loss, grad=grad.asnumpy(), class_start=pfc.class_start, num_local=pfc.num_local,
                        index=index, dw=dw, w0=w0, w1=pfc.weight.copy(), m0=m0, m1=pfc.weight_mom.copy()))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_matches_dense_reference(world_size):
    from recognition.partial_fc.cpu_kernels import init_rows
    results = run_ranks(exactness_body, np=world_size, timeout=180, kwargs={"cases": CASES})
    x, y = global_batch(world_size)
    w_full = init_rows(np.arange(NUM_CLASSES), DIM, seed=0)
    shard_sizes = [results[r][0]["num_local"] for r in range(world_size)]
    assert sum(shard_sizes) == NUM_CLASSES and max(shard_sizes) - min(shard_sizes) <= 1
    for k, (ratio, margins, filt, kernels, bank) in enumerate(CASES):
        per_rank = [results[r][k] for r in range(world_size)]
        classes = np.concatenate([p["class_start"] + p["index"] for p in per_rank])
        assert np.all(np.diff(classes) > 0)
        assert set(y.tolist()) <= set(classes.tolist()), "a positive was dropped"
        for p in per_rank:
            expected = p["num_local"] if ratio == 1.0 else int(ratio * p["num_local"])
            assert p["index"].size == max(expected, np.unique(
                y[(y >= p["class_start"]) & (y < p["class_start"] + p["num_local"])]).size)
            np.testing.assert_array_equal(p["w0"], w_full[p["class_start"]:p["class_start"] + p["num_local"]])
        ref_loss, ref_dx, ref_dw, _ = dense_reference(x, y, w_full, classes, margins, 64.0, filt)
        losses = [p["loss"] for p in per_rank]
        assert len(set(losses)) == 1, "loss differs between ranks: %s" % losses
        assert losses[0] == pytest.approx(ref_loss, rel=1e-5)
        dx = np.concatenate([p["grad"] for p in per_rank])
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5 * np.abs(ref_dx).max())
        dw = np.concatenate([p["dw"] for p in per_rank])
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * np.abs(ref_dw).max())
        # the memory-bank step moved exactly the sampled rows, by lr * (grad + wd * w) (momentum starts at 0)
        for p, lo in zip(per_rank, np.cumsum([0] + shard_sizes[:-1])):
            sampled = p["index"]
            rows_dw = ref_dw[(classes >= lo) & (classes < lo + p["num_local"])]
            v = -0.1 * (rows_dw + 5e-4 * p["w0"][sampled])
            np.testing.assert_allclose(p["m1"][sampled], v, rtol=1e-4, atol=1e-6 * np.abs(v).max())
            np.testing.assert_allclose(p["w1"][sampled], p["w0"][sampled] + v, rtol=1e-5, atol=1e-5 * np.abs(v).max())
            rest = np.setdiff1d(np.arange(p["num_local"]), sampled)
            np.testing.assert_array_equal(p["w1"][rest], p["w0"][rest])
            np.testing.assert_array_equal(p["m1"][rest], p["m0"][rest])


IGNORED_ROWS = [2, 9, 15]     # rows labelled IGNORE_LABEL (padding): on both ranks of a 2-rank batch


def ignored_rows_body(cases):
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import IGNORE_LABEL, PartialFC
    rank = hvd.rank()
    x, y = global_batch(hvd.size(), seed=1)
    y[IGNORED_ROWS] = IGNORE_LABEL
    own = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out = []
    for ratio, kernels in cases:
        pfc = PartialFC(NUM_CLASSES, DIM, sample_ratio=ratio, margins=ARC, kernels=kernels, seed=0)
        loss, grad = pfc.forward_backward(mx.nd.array(x[own]), mx.nd.array(y[own], dtype="int64"))
        index = np.asarray(pfc.sampled_index).copy()
        out.append(dict(loss=loss, grad=grad.asnumpy(), class_start=pfc.class_start, index=index,
                        dw=pfc.sampled_weight_grad()))
        pfc.update(0.1)
        everything_ignored = np.full(LOCAL_BATCH, IGNORE_LABEL, dtype=np.int64)
        loss, grad = pfc.forward_backward(mx.nd.array(x[own]), mx.nd.array(everything_ignored, dtype="int64"))
        out[-1].update(empty_loss=loss, empty_grad=grad.asnumpy(), empty_dw=pfc.sampled_weight_grad())
    return out


def test_ignored_rows_take_no_part_in_loss_or_gradients():
    """Padding rows (label -1) are left out: the result equals the reference on the labelled rows alone."""
    from recognition.partial_fc.cpu_kernels import init_rows
    cases = [(1.0, "numpy"), (0.1, "numpy"), (0.1, "ndarray")]
    results = run_ranks(ignored_rows_body, np=2, timeout=180, kwargs={"cases": cases})
    x, y = global_batch(2, seed=1)
    labelled = np.setdiff1d(np.arange(y.size), IGNORED_ROWS)
    w_full = init_rows(np.arange(NUM_CLASSES), DIM, seed=0)
    for k, (ratio, kernels) in enumerate(cases):
        per_rank = [results[r][k] for r in range(2)]
        classes = np.concatenate([p["class_start"] + p["index"] for p in per_rank])
        ref_loss, ref_dx, ref_dw, _ = dense_reference(x[labelled], y[labelled], w_full, classes, ARC, 64.0)
        assert per_rank[0]["loss"] == per_rank[1]["loss"] == pytest.approx(ref_loss, rel=1e-5)
        dx = np.concatenate([p["grad"] for p in per_rank])
        assert not np.any(dx[IGNORED_ROWS])
        np.testing.assert_allclose(dx[labelled], ref_dx, rtol=1e-5, atol=1e-5 * np.abs(ref_dx).max())
        dw = np.concatenate([p["dw"] for p in per_rank])
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * np.abs(ref_dw).max())
        for p in per_rank:     # a batch of padding only: nothing to learn
            assert p["empty_loss"] == 0.0
            assert not np.any(p["empty_grad"]) and not np.any(p["empty_dw"])


def bad_input_body():
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    rank = hvd.rank()
    pfc = PartialFC(100, 8, sample_ratio=0.5)
    good_x = mx.nd.ones((4, 8))
    good_y = mx.nd.array([1, 2, 3, 4], dtype="int64")
    cases = {
        "label_too_big": (good_x, mx.nd.array([1, 2, 3, 100], dtype="int64") if rank == 1 else good_y),
        "label_negative": (good_x, mx.nd.array([-5, 2, 3, 4], dtype="int64") if rank == 0 else good_y),
        "nan": (mx.nd.array(np.full((4, 8), np.nan)) if rank == 1 else good_x, good_y),
        "batch_mismatch": (mx.nd.ones((3, 8)) if rank == 1 else good_x,
                           mx.nd.array([1, 2, 3], dtype="int64") if rank == 1 else good_y),
        "dim_mismatch": (mx.nd.ones((4, 7)) if rank == 0 else good_x, good_y),
        "float_labels": (good_x, mx.nd.array([1, 2, 3, 4], dtype="float32") if rank == 1 else good_y),
    }
    messages = {}
    for name, (x, y) in cases.items():
        try:
            pfc.forward_backward(x, y)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    loss, _ = pfc.forward_backward(good_x, good_y)   # the ranks are still in step afterwards
    return messages, loss


def test_bad_input_raises_the_same_clear_error_on_every_rank():
    results = run_ranks(bad_input_body, np=2, timeout=120)
    (msgs0, loss0), (msgs1, loss1) = results
    assert msgs0 == msgs1
    # the input protocol shared with FFC (recognition/common/collective_input.py) names rank, input and row
    assert "rank 1 batch row 3 has label 100 outside [0, 100) (-1 marks an ignored row)" in msgs0["label_too_big"]
    assert "rank 0 batch row 0 has label -5 outside [0, 100)" in msgs0["label_negative"]
    assert "rank 1 batch has 32 non-finite values (NaN/inf)" in msgs0["nan"]
    assert "rank 1 has batch size 3 but rank 0 has 4" in msgs0["batch_mismatch"]
    assert "rank 0 batch has shape of 2 dimensions with 7 columns, expected (rows, 8)" in msgs0["dim_mismatch"]
    assert "rank 1 passed non-integer batch labels" in msgs0["float_labels"]
    assert all(m.startswith("PartialFC: bad input at step 0: ") for m in msgs0.values()), msgs0
    assert np.isfinite(loss0) and loss0 == loss1


def filter_body(kernels):
    """Two samples against six classes on 1 or 2 ranks, with centres placed so that filtering matters."""
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    pfc = PartialFC(6, 4, margins=COS, interclass_filter=0.4, seed=0, kernels=kernels)
    w = filter_centres()
    pfc.bank.write(0, w[pfc.class_start:pfc.class_start + pfc.num_local], np.zeros((pfc.num_local, 4), np.float32))
    x, y = filter_batch()
    own = slice(hvd.rank() * 2 // hvd.size(), (hvd.rank() + 1) * 2 // hvd.size())
    loss, grad = pfc.forward_backward(mx.nd.array(x[own]), mx.nd.array(y[own], dtype="int64"))
    return loss, grad.asnumpy(), pfc.sampled_weight_grad()


def filter_centres():
    w = np.eye(6, 4, dtype=np.float32)
    w[4] = [1, 1, 0, 0]       # cos 0.707 with sample 0's direction
    w[5] = [1, 0.5, 0, 0]     # cos 0.894
    return w


def filter_batch():
    x = np.array([[1, 0.1, 0, 0], [0, 0, 1, 0]], np.float32)
    y = np.array([3, 1])      # both targets far (cos 0): the loss is large and filtering matters
    return x, y


@pytest.mark.parametrize("world_size,kernels", [(1, "numpy"), (2, "numpy"), (2, "ndarray")])
def test_interclass_filter_zeroes_the_negatives_above_the_threshold(world_size, kernels):
    """As arcface_torch's CombinedMarginLoss: a negative whose cosine exceeds the threshold becomes cosine 0. It
    keeps its exp(0) in the denominator and gets no gradient. Checked against a NumPy re-computation written
    here from that rule, on 1 and 2 ranks (rank 0 holds classes 0-2, rank 1 classes 3-5: sample 0's target
    is on one rank, its filtered negatives on the other)."""
    results = run_ranks(filter_body, np=world_size, timeout=120, kwargs={"kernels": kernels})
    x, y, w = *filter_batch(), filter_centres()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = xn.astype(np.float64) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    dirty = (cos > 0.4) & (np.arange(6)[None, :] != y[:, None])
    assert dirty.tolist() == [[True, False, False, False, True, True], [False, False, True, False, False, False]]
    z = 64.0 * np.where(dirty, 0.0, cos)
    z[[0, 1], y] = 64.0 * (cos[[0, 1], y] - 0.4)
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[[0, 1], y])
    dw = np.concatenate([r[2] for r in results])
    for loss, _, _ in results:
        assert loss == pytest.approx(expected, rel=1e-6)
    ref_loss, ref_dx, ref_dw, _ = dense_reference(x, y, w, np.arange(6), COS, 64.0, 0.4)
    assert ref_loss == pytest.approx(expected, rel=1e-7)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), ref_dx, rtol=1e-5, atol=1e-7)
    removed = 64.0 * np.where(dirty, -np.inf, cos)    # the other reading (dropping them) gives another loss
    removed[[0, 1], y] = z[[0, 1], y]
    assert np.mean(np.log(np.exp(removed).sum(axis=1)) - z[[0, 1], y]) < expected - 0.1


def convergence_body(steps):
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.operator import PartialFC
    rank = hvd.rank()
    num_classes, dim, batch = 2000, 32, 32
    table = np.random.default_rng(123).standard_normal((num_classes, dim)).astype(np.float32)  # one row per class
    pfc = PartialFC(num_classes, dim, sample_ratio=0.1, margins=COS, scale=32.0, seed=7)
    losses = []
    for step in range(steps):
        labels = np.random.default_rng([step, rank]).integers(0, num_classes, batch)
        loss, grad = pfc.forward_backward(mx.nd.array(table[labels]), mx.nd.array(labels, dtype="int64"))
        pfc.update(lr=1.0)
        np.subtract.at(table, labels, 20.0 * grad.asnumpy())   # the embedding table learns too
        losses.append(loss)
    return losses


def test_operator_alone_drives_the_loss_down_steadily():
    losses = run_ranks(convergence_body, np=2, timeout=180, kwargs={"steps": 150})
    assert losses[0] == losses[1]
    windows = np.array(losses[0]).reshape(10, 15).mean(axis=1)
    assert np.all(np.diff(windows) < 0), windows
    assert windows[-1] < 0.3 * windows[0], windows
