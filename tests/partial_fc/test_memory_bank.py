"""Memory banks: deterministic initialisation, gather, and the SGD-momentum step on sampled rows only."""
import numpy as np
import mxnet as mx
import pytest

from recognition.dist import shard_range
from recognition.partial_fc.cpu_kernels import init_rows
from recognition.partial_fc.memory_bank import DeviceBank, HostBank, make_bank
from tests.partial_fc.pfc_reference import init_rows_reference


def test_shards_are_contiguous_balanced_and_cover_every_class():
    for num_classes in (10, 11, 1000, 1001):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(num_classes, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_init_rows_is_a_function_of_seed_and_class_id():
    a = init_rows(np.arange(100), 16, seed=5)
    b = init_rows(np.array([70, 3, 99]), 16, seed=5)
    np.testing.assert_array_equal(b, a[[70, 3, 99]])
    assert not np.array_equal(init_rows(np.arange(100), 16, seed=6), a)
    big = init_rows(np.arange(20000), 64, seed=0)
    assert abs(big.mean()) < 2e-4 and abs(big.std() - 0.01) < 2e-4
    # shards of any world size start from the same rows
    shard = HostBank(40, 16, class_start=60, seed=5)
    np.testing.assert_array_equal(shard.weight, a[60:100])


def test_init_rows_follow_the_numpy_formula_and_fill_strided_buffers():
    ids = np.array([0, 1, 77, 5_000_003, 123_456_789], dtype=np.int64)
    expected = init_rows_reference(ids, 24, seed=9)
    # the kernel's float32 log / cos: a few float32 ulps, or 1e-5 of the std near cos' zeros (angle rounding)
    np.testing.assert_allclose(init_rows(ids, 24, seed=9), expected, rtol=1e-5, atol=1e-7)
    # the disk bank's layout: weight and momentum interleaved per row, only the selected rows written
    from recognition.partial_fc import cpu_kernels
    from recognition.partial_fc.cpu_kernels import init_key
    buf = np.full((ids.size, 2, 24), 7.0, np.float32)
    selected = np.array([True, False, True, True, False])
    cpu_kernels.normal_rows(ids, init_key(9), 0.01, buf[:, 0], selected=selected, momentum=buf[:, 1])
    np.testing.assert_allclose(buf[selected, 0], expected[selected], rtol=1e-5, atol=1e-7)
    assert not buf[selected, 1].any()
    assert np.all(buf[~selected] == 7.0)


def _hand_step(w, v, grad_unit, lr, mom, wd):
    """Float64 reference: normalisation backward, then MXNet's sgd_mom_update rule."""
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    unit = w / norm
    g = (grad_unit - unit * np.sum(unit * grad_unit, axis=1, keepdims=True)) / norm
    v_new = mom * v - lr * (g + wd * w)
    return w + v_new, v_new


@pytest.mark.parametrize("bank_kind", ["host", "device_ndarray"])
@pytest.mark.parametrize("full", [False, True])
def test_pull_normalises_and_update_touches_only_the_sampled_rows(bank_kind, full):
    num_local, dim = 30, 8
    if bank_kind == "host":
        bank = HostBank(num_local, dim, class_start=100, seed=1)
        to_native, to_numpy = (lambda a: a), (lambda a: a)
    else:
        bank = DeviceBank(num_local, dim, class_start=100, seed=1, ctx=mx.cpu())
        to_native, to_numpy = mx.nd.array, (lambda a: a.asnumpy())
    index = None if full else np.array([2, 3, 17, 29], dtype=np.int64)
    rows_idx = np.arange(num_local) if full else index
    rng = np.random.default_rng(0)
    w0, v0 = bank.weight.copy(), bank.momentum.copy()
    expected_w, expected_v = w0.astype(np.float64), v0.astype(np.float64)
    for lr in (0.1, 0.05):   # two steps: the second one starts from a non-zero momentum
        unit, inv_norm = bank.pull(index)
        rows = expected_w[rows_idx]
        norms = np.linalg.norm(rows, axis=1)
        np.testing.assert_allclose(to_numpy(unit), rows / norms[:, None], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_numpy(inv_norm), 1 / norms, rtol=1e-5)
        grad_unit = rng.standard_normal((rows_idx.size, dim)).astype(np.float32)
        bank.apply_grad(index, to_native(grad_unit), inv_norm, lr, 0.9, 5e-4)
        w_new, v_new = _hand_step(rows, expected_v[rows_idx], grad_unit.astype(np.float64), lr, 0.9, 5e-4)
        expected_w[rows_idx], expected_v[rows_idx] = w_new, v_new
        np.testing.assert_allclose(bank.weight, expected_w, rtol=1e-5, atol=1e-5 * np.abs(v_new).max())
        np.testing.assert_allclose(bank.momentum, expected_v, rtol=1e-5, atol=1e-5 * np.abs(v_new).max())
    untouched = np.setdiff1d(np.arange(num_local), rows_idx)
    np.testing.assert_array_equal(bank.weight[untouched], w0[untouched])
    np.testing.assert_array_equal(bank.momentum[untouched], v0[untouched])
    assert np.all(bank.momentum[untouched] == 0)


def test_read_write_round_trip_and_bad_location():
    bank = HostBank(10, 4, class_start=0)
    w = np.ones((3, 4), np.float32)
    bank.write(5, w, 2 * w)
    got_w, got_m = bank.read(5, 8)
    np.testing.assert_array_equal(got_w, w)
    np.testing.assert_array_equal(got_m, 2 * w)
    with pytest.raises(ValueError, match="bank_location"):
        make_bank("cloud", mx.cpu(), 10, 4, 0)


@pytest.mark.parametrize("bank_kind", ["host", "disk"])
@pytest.mark.parametrize("full", [False, True])
def test_raw_rows_and_the_scaled_update_follow_the_reference(tmp_path, bank_kind, full):
    """The CPU kernels' path: raw rows with their 1/norms; the update given h = gu / ||w||."""
    from recognition.partial_fc.disk_bank import DiskBank
    num_local, dim = 30, 40        # dim not a multiple of 16: the norm's tail
    bank = (HostBank(num_local, dim, class_start=100, seed=1) if bank_kind == "host"
            else DiskBank(num_local, dim, class_start=100, seed=1, directory=str(tmp_path)))
    index = None if full else np.array([2, 3, 17, 29], dtype=np.int64)
    rows_idx = np.arange(num_local) if full else index
    rng = np.random.default_rng(2)
    w, v = bank.weight.astype(np.float64), np.zeros((num_local, dim))
    for step in range(3):
        before = bank.weight.copy()       # (the disk bank's reads reuse the pulled rows' buffer: read first)
        rows, inv_norm = bank.pull_raw(index)
        assert rows.flags.c_contiguous and rows.dtype == np.float32
        np.testing.assert_array_equal(rows, before[rows_idx])
        np.testing.assert_allclose(inv_norm, 1 / np.linalg.norm(w[rows_idx], axis=1), rtol=1e-6)
        grad_unit = rng.standard_normal((len(rows_idx), dim))
        h = (grad_unit * inv_norm[:, None]).astype(np.float32)
        bank.apply_scaled_grad(index, h, inv_norm, 0.1, 0.9, 5e-4)
        w_new, v_new = _hand_step(w[rows_idx], v[rows_idx], h / inv_norm[:, None], 0.1, 0.9, 5e-4)
        w[rows_idx], v[rows_idx] = w_new, v_new
        np.testing.assert_allclose(bank.weight, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bank.momentum, v, rtol=1e-5, atol=1e-6)
    if bank_kind == "host":     # the kept 1/norms: the bits a fresh computation gives (resume = no resume)
        from recognition.partial_fc.cpu_kernels import row_inv_norms
        kept = bank.pull_raw(None)[1]
        np.testing.assert_array_equal(kept, row_inv_norms(bank.weight.copy()))
        bank.write(4, np.full((2, dim), 3.0, np.float32), np.zeros((2, dim), np.float32))
        assert bank.pull_raw(None)[1][4] == bank.pull_raw(None)[1][5] == np.float32(1 / np.sqrt(9.0 * dim))
    if bank_kind == "disk":
        bank.close()


def test_kept_norms_after_many_full_updates_are_the_recomputed_bits():
    """Full-shard updates refresh each row's 1/norm inside the SGD loop (a few rows at a time); a resumed run
    recomputes them from the rows: both must give the same bits, or a resumed run would drift from a straight
    one."""
    from recognition.partial_fc.cpu_kernels import row_inv_norms
    num_local, dim = 1000, 512
    bank = HostBank(num_local, dim, class_start=0, seed=3)
    rng = np.random.default_rng(4)
    for step in range(4):
        rows, inv_norm = bank.pull_raw(None)
        h = (rng.standard_normal((num_local, dim)) * 0.01).astype(np.float32)
        for lo in range(0, num_local, 300):       # in blocks, as the CPU kernels push them
            hi = min(lo + 300, num_local)
            bank.apply_scaled_grad(None, h[lo:hi], inv_norm[lo:hi], 0.5, 0.9, 5e-4, offset=lo)
        np.testing.assert_array_equal(bank.pull_raw(None)[1], row_inv_norms(bank.weight.copy()))
    # a sampled update makes them stale; the next full pull recomputes them
    bank.apply_scaled_grad(np.array([3, 9]), np.ones((2, dim), np.float32), inv_norm[[3, 9]], 0.5, 0.9, 5e-4)
    np.testing.assert_array_equal(bank.pull_raw(None)[1], row_inv_norms(bank.weight.copy()))


def test_scale_columns_matches_numpy():
    from recognition.partial_fc.cpu_kernels import scale_columns
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 33)).astype(np.float32)
    col, row = rng.uniform(0.5, 2, 33).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    np.testing.assert_allclose(scale_columns(a.copy(), col), a * col, rtol=1e-6)
    np.testing.assert_allclose(scale_columns(a.copy(), col, row), a * col * row[:, None], rtol=1e-6)


def test_the_cpu_kernels_refuse_a_bank_without_raw_rows():
    from collections import defaultdict
    from recognition.common.margin import CombinedMargin
    from recognition.partial_fc.bank_queue import BankQueue
    from recognition.partial_fc.kernels_cpu import CPUKernels
    with pytest.raises(TypeError, match="raw rows in host memory.*DeviceBank"):
        CPUKernels(mx.cpu(), scale=64.0, margin=CombinedMargin(1.0, 0.5, 0.0), interclass_filter=0.0, momentum=0.9,
                   weight_decay=5e-4, bank=DeviceBank(4, 8, 0), bank_jobs=BankQueue(threaded=False),
                   timings=defaultdict(float))
