"""tools/benchmark_pfc.py's floors: every kernel of the independent floor (tools/pfc_floor.py) against NumPy
float64, the bank floor's passes, the floor process's protocol, and the chosen floor on the head's products."""
import numpy as np
import pytest

from tools.benchmark_pfc import ChosenFloor, ratios
from tools.pfc_floor import FLOOR_KERNELS, BankPasses, FloorProducts, FloorWorker

B, K, D, BLOCK = 6, 70, 12, 32     # 70 = 2 full blocks and a partial one


@pytest.mark.parametrize("product,kernel", [(p, k) for p, kernels in FLOOR_KERNELS.items() for k in kernels])
def test_floor_kernels_compute_the_products(product, kernel):
    floor = FloorProducts(B, K, D, BLOCK)
    x, w, g = (a.astype(np.float64) for a in (floor.x, floor.w, floor.g))
    floor.z[:], floor.e[:], floor.c[:] = np.nan, np.nan, np.nan
    assert floor.run(product, kernel) > 0
    if product == "logits":
        np.testing.assert_allclose(floor.z, x @ w.T, rtol=1e-5, atol=1e-5)
    elif product == "embedding":
        np.testing.assert_allclose(floor.e, g @ w, rtol=1e-5, atol=1e-4)
    else:       # the last block (rows 64-69) stays in the reused block buffer
        np.testing.assert_allclose(floor.c[:K - 64], g[:, 64:].T @ x, rtol=1e-5, atol=1e-5)
    # the laid-out copies are the operands, transposed
    np.testing.assert_array_equal(floor.w_t, floor.w.T)
    np.testing.assert_array_equal(floor.g_t, floor.g.T)


@pytest.mark.parametrize("num_local", [K, 500])
def test_bank_floor_gathers_and_applies_sgd_with_momentum(num_local):
    bank = BankPasses(num_local, K, D)      # the constructor ran both passes once (compilation)
    w, m = bank.weight.astype(np.float64), bank.mom.astype(np.float64)
    idx = bank.index
    assert len(idx) == K and len(np.unique(idx)) == K and np.all(np.diff(idx) > 0)
    seconds = bank.run()
    assert set(seconds) == {"gather", "update"} and seconds["update"] > 0
    if num_local == K:      # every row sampled: the products read the shard itself, nothing is gathered
        assert bank.out is None
    else:
        np.testing.assert_array_equal(bank.out, w[idx].astype(np.float32))     # the rows before this run's update
    v = 0.9 * m[idx] - 1e-6 * (bank.grad + 5e-4 * w[idx])
    np.testing.assert_allclose(bank.mom[idx], v, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(bank.weight[idx], w[idx] + v, rtol=1e-6, atol=1e-9)
    untouched = np.setdiff1d(np.arange(num_local), idx)
    np.testing.assert_array_equal(bank.weight[untouched], w[untouched].astype(np.float32))


def test_floor_worker_picks_the_fastest_and_times_on_request():
    worker = FloorWorker(B, K, D, BLOCK, rounds=1)
    try:
        info = worker.info
        for product, kernels in FLOOR_KERNELS.items():
            ms = info["candidate_ms"][product]
            assert set(ms) == set(kernels) and all(0 < v < 1000 for v in ms.values())
            assert info["kernels"][product] == min(ms, key=ms.get)
        timing, bank = worker.time_ms()
        assert set(timing) == {"logits", "embedding", "centre"} and all(v > 0 for v in timing.values())
        assert bank == {}       # no bank floor asked for
    finally:
        worker.close()
    assert not worker._proc.is_alive()
    worker = FloorWorker(B, K, D, BLOCK, rounds=1, num_local=300)
    try:
        _, bank = worker.time_ms()
        assert set(bank) == {"gather", "update"} and all(v > 0 for v in bank.values())
    finally:
        worker.close()


def test_chosen_floor_runs_the_head_kernels():
    floor = ChosenFloor({"logits": "dot", "embedding": "numpy", "centre": "onednn"}, B, K, D, BLOCK)
    ms = floor.time_ms()
    assert set(ms) == {"logits", "embedding", "centre"} and all(v > 0 for v in ms.values())
    np.testing.assert_allclose(floor.c[:K - 64], floor.z[:, 64:].T.astype(np.float64) @ floor.x, rtol=1e-5,
                               atol=1e-4)


def test_ratios_are_per_round_medians():
    steps = [[10.0, 12.0, 30.0], [20.0, 20.0]]
    floors = [[{"logits": 2.0, "embedding": 3.0, "centre": 5.0}] * 3, [{"logits": 5, "embedding": 5, "centre": 0}] * 2]
    assert ratios(steps, floors) == (1.6, 1.2, 2.0, [1.2, 2.0])
