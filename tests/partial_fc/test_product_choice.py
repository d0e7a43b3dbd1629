"""The start-up choice of the CPU head's product kernels: the setting, numpy's BLAS only on a real core, the
pick, the timing, and the CPU kernel set exact against the NumPy reference with every kernel."""
import logging
from collections import defaultdict

import numpy as np
import pytest

from tests.partial_fc.pfc_reference import dense_reference

ALL = ("onednn", "dot", "numpy")


def pools(core, internal="openblas", path="/venv/numpy.libs/libopenblas64_p-r0.so"):
    return [{"user_api": "blas", "internal_api": internal, "filepath": path, "architecture": core, "version": "0.3"},
            {"user_api": "blas", "internal_api": "openblas", "filepath": "/venv/scipy.libs/libopenblas.so",
             "architecture": "Prescott"}]


def test_parse_setting():
    from recognition.partial_fc.product_choice import parse_setting
    assert parse_setting(None) == dict.fromkeys(("logits", "embedding", "centre"), "auto")
    assert parse_setting(" Numpy ") == dict.fromkeys(("logits", "embedding", "centre"), "numpy")
    assert parse_setting("centre=numpy, logits=dot") == {"logits": "dot", "embedding": "auto", "centre": "numpy"}
    for bad, words in [("mkl", "must be one of"), ("centre=mkl", "'centre=mkl'"), ("bias=dot", "'bias=dot'"),
                       ("logits=numpy,embedding=onednn", "backward of the oneDNN logits")]:
        with pytest.raises(ValueError, match=words) as err:
            parse_setting(bad)
        assert "PFC_CPU_PRODUCTS" in str(err.value)


def test_numpy_blas_only_on_a_core_made_for_this_cpu():
    from recognition.partial_fc.product_choice import numpy_blas_problem, resolve
    assert numpy_blas_problem(pools("Zen"), "avx2") is None
    assert numpy_blas_problem(pools("SkylakeX"), "avx512") is None
    assert numpy_blas_problem(pools(None, internal="mkl"), "avx512") is None
    assert numpy_blas_problem(pools("Prescott"), None) is None      # a CPU without AVX2: no better core exists
    assert "'Sandybridge'" in numpy_blas_problem(pools("Sandybridge"), "avx2")
    problem = numpy_blas_problem(pools("Prescott"), "avx512")
    assert "generic core 'Prescott'" in problem and "AVX512" in problem
    assert "not found" in numpy_blas_problem(pools("Zen")[1:], "avx2")     # only scipy's copy
    # auto leaves numpy out on a generic core; forcing it there is an error naming the reason
    assert resolve("auto", pools("Prescott"), "avx2") == dict.fromkeys(("logits", "embedding", "centre"),
                                                                       ("onednn", "dot"))
    assert resolve("auto", pools("Haswell"), "avx2")["centre"] == ALL
    with pytest.raises(ValueError, match="numpy's BLAS for the centre product, but numpy's OpenBLAS .* 'Prescott'"):
        resolve("centre=numpy", pools("Prescott"), "avx2")
    # an explicit kernel does not look at numpy's core at all
    assert resolve("dot", pools("Prescott"), "avx2")["logits"] == ("dot",)


def test_pick_pairs_the_onednn_embedding_gradient_with_the_onednn_logits():
    from recognition.partial_fc.product_choice import allowed_kernels, parse_setting, pick
    allowed = allowed_kernels(parse_setting("auto"), None)
    times = {"logits": {"onednn": 3.0, "dot": 2.0, "numpy": 2.5},
             "embedding": {"onednn": 1.0, "dot": 3.0, "numpy": 2.5},
             "centre": {"onednn": 2.0, "dot": 1.5, "numpy": 1.6}}
    assert pick(allowed, times) == {"logits": "onednn", "embedding": "onednn", "centre": "dot"}    # 4.0 < 2.0+2.5
    times["embedding"]["onednn"] = 2.0          # 4.5 against oneDNN's 5.0: within the margin, oneDNN stays
    assert pick(allowed, times) == {"logits": "onednn", "embedding": "onednn", "centre": "dot"}
    times["embedding"]["onednn"] = 3.0          # 4.5 against 6.0: 25 % faster
    assert pick(allowed, times) == {"logits": "dot", "embedding": "numpy", "centre": "dot"}
    times["centre"]["onednn"] = 1.7             # dot 1.5 against 1.7: within the margin
    assert pick(allowed, times)["centre"] == "onednn"
    assert pick(allowed) == dict.fromkeys(("logits", "embedding", "centre"), "onednn")     # untimed: oneDNN
    forced = allowed_kernels(parse_setting("logits=numpy"), None)
    assert forced["embedding"] == ("dot", "numpy") and pick(forced)["embedding"] == "dot"


def test_centre_blocks_are_spread_over_the_real_width():
    """The centre gradient's candidates read column blocks as the update does: at the logits buffer's real row
    stride, spread over its width, as many columns as the other products are timed on."""
    from recognition.partial_fc.product_choice import centre_blocks
    assert centre_blocks(500000, 8192, 4096) == [(0, 4096), (250000, 254096)]
    assert centre_blocks(8192, 8192, 4096) == [(0, 4096), (4096, 8192)]
    assert centre_blocks(300, 300, 128) == [(0, 128), (128, 256), (256, 300)]
    assert centre_blocks(1000, 300, 128) == [(0, 128), (333, 461), (666, 794)]


def test_tiny_heads_run_onednn_untimed(caplog):
    """The tests' tiny heads (the golden runs) are too small to time: oneDNN, as before the choice existed."""
    from recognition.partial_fc.product_choice import choose, resolve
    with caplog.at_level(logging.INFO, logger="recognition.train"):
        choice = choose(np.ones((8, 16), np.float32), np.ones((5, 16), np.float32), 4096, resolve("auto"))
    assert choice.how == "untimed" and choice.kernels == dict.fromkeys(("logits", "embedding", "centre"), "onednn")
    assert "too small to time" in caplog.text


def test_timed_choice_is_the_fastest_measured(monkeypatch, caplog):
    from recognition.partial_fc import product_choice
    from recognition.partial_fc.product_choice import choose, pick, resolve
    monkeypatch.setattr(product_choice, "MIN_TIMED_FLOATS", 0)
    monkeypatch.setattr(product_choice, "TIMED_FLOATS", 300 * 16)
    allowed = resolve("auto")
    with caplog.at_level(logging.INFO, logger="recognition.train"):
        rng = np.random.default_rng(0)
        grad = np.zeros((8, 1000), np.float32)
        choice = choose(rng.standard_normal((8, 16), dtype=np.float32),
                        rng.standard_normal((1000, 16), dtype=np.float32), 128, allowed, grad=grad)
    assert choice.how == "timed" and choice.timed_rows == 300
    for product, kernels in allowed.items():
        assert set(choice.ms[product]) == set(kernels)
        assert all(0 < ms < 1000 for ms in choice.ms[product].values())
    assert choice.kernels == pick(allowed, choice.ms)
    assert caplog.text.count("Partial FC products on") == 1 and "timed at 300 rows" in caplog.text


@pytest.mark.parametrize("setting", ["onednn", "dot", "numpy", "logits=dot,embedding=numpy,centre=onednn"])
def test_cpu_kernel_set_with_every_kernel_matches_the_reference(setting, caplog):
    """One step of the CPU kernel set with the products forced: loss, embedding gradient, centre gradient and the
    SGD-updated bank against the float64 reference; the choice is logged once."""
    import horovod.mxnet as hvd
    import mxnet as mx
    from recognition.common.margin import CombinedMargin
    from recognition.common.rows import l2_normalize_rows, normalization_backward
    from recognition.partial_fc.bank_queue import BankQueue
    from recognition.partial_fc.kernels_cpu import CPUKernels
    from recognition.partial_fc.memory_bank import HostBank
    from recognition.partial_fc.product_choice import numpy_blas_problem
    from recognition.progress import PhaseClock
    if "numpy" in setting and numpy_blas_problem():
        pytest.skip("numpy's BLAS cannot be forced here: %s" % numpy_blas_problem())
    hvd.init()
    margins, scale, batch, k, dim = (1.0, 0.5, 0.0), 32.0, 6, 300, 8
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    labels = rng.integers(0, k, batch)
    bank = HostBank(k, dim, 0, seed=4)
    w0 = bank.weight.copy()
    kernels = CPUKernels(mx.cpu(), scale=scale, margin=CombinedMargin(*margins), interclass_filter=0.0,
                         momentum=0.9, weight_decay=5e-4, bank=bank, bank_jobs=BankQueue(threaded=False),
                         timings=defaultdict(float), cpu_products=setting)
    ref_loss, ref_dx, ref_dw, _ = dense_reference(x, labels, w0, np.arange(k), margins, scale)
    with caplog.at_level(logging.INFO, logger="recognition.train"):
        for step in range(2):      # the second step reuses the choice (logged once)
            rows, inv_norm = kernels.pull(None)
            xn, x_inv = l2_normalize_rows(x)
            loss, grad_xn = kernels.forward_backward(xn, rows, inv_norm, None, labels, np.ones(batch, bool),
                                                     PhaseClock(defaultdict(float)))
            if step == 0:
                assert loss == pytest.approx(ref_loss, rel=1e-5)
                dx = normalization_backward(xn, x_inv, grad_xn)
                np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5 * np.abs(ref_dx).max())
                dw = kernels.centre_grad()
                np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5 * np.abs(ref_dw).max())
            kernels.update(0.1, step)
            if step == 0:       # momentum starts at 0: one step moves each row by -lr * (grad + wd * w)
                np.testing.assert_allclose(bank.weight, w0 - 0.1 * (ref_dw + 5e-4 * w0), rtol=1e-5, atol=1e-6)
    expected = dict(kv.split("=") for kv in setting.split(",")) if "=" in setting else dict.fromkeys(
        ("logits", "embedding", "centre"), setting)
    assert kernels.choice.kernels == expected and kernels.choice.how == "forced"
    assert caplog.text.count("Partial FC products on") == 1


def test_bad_setting_fails_when_the_kernel_set_is_built(monkeypatch):
    import mxnet as mx
    from recognition.partial_fc.kernels_cpu import CPUKernels
    monkeypatch.setenv("PFC_CPU_PRODUCTS", "fastest")
    with pytest.raises(ValueError, match="PFC_CPU_PRODUCTS must be one of"):
        CPUKernels(mx.cpu(), scale=1.0, margin=None, interclass_filter=0.0, momentum=0.9, weight_decay=0.0,
                   bank=None, bank_jobs=None)
