"""The head's products in every kernel against NumPy float64, and numpy's BLAS reached only through its own
candidate in the CPU hot path."""
import ast
import os

import numpy as np
import pytest

from tests.harness import ROOT

KERNELS = ("onednn", "dot", "numpy")
PAIRS = [(l, e) for l in KERNELS for e in KERNELS if not (e == "onednn" and l != "onednn")]


@pytest.mark.parametrize("logits,embedding", PAIRS)
def test_logits_product_and_its_data_gradient(logits, embedding):
    from recognition.partial_fc import products
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 24)).astype(np.float32), rng.standard_normal((300, 24)).astype(np.float32)
    out = np.full((5, 300), np.nan, np.float32)
    product = products.LogitsProduct(x, w, out, logits, embedding)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((5, 300)).astype(np.float32)
    out[:] = g                              # the caller overwrites the logits with their gradient in place
    np.testing.assert_allclose(product.data_grad(), g.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)
    assert out.flags.writeable and w.flags.writeable      # only the views handed to MXNet became read-only


def test_onednn_embedding_gradient_needs_the_onednn_logits():
    from recognition.partial_fc import products
    x, w, out = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), np.empty((2, 4), np.float32)
    with pytest.raises(ValueError, match="backward of the oneDNN logits"):
        products.LogitsProduct(x, w, out, "dot", "onednn")
    with pytest.raises(ValueError, match="unknown logits kernel 'blas'"):
        products.LogitsProduct(x, w, out, "blas", "dot")
    with pytest.raises(ValueError, match="unknown centre-gradient kernel"):
        products.CentreProduct(x, "mkl")


@pytest.mark.parametrize("kernel", KERNELS)
def test_centre_gradient_block(kernel):
    from recognition.partial_fc import products
    rng = np.random.default_rng(1)
    g, x = rng.standard_normal((5, 300)).astype(np.float32), rng.standard_normal((5, 24)).astype(np.float32)
    centre = products.CentreProduct(x, kernel)
    scratch, out = np.full((150, 5), np.nan, np.float32), np.full((137, 24), np.nan, np.float32)
    got = centre.block(g, 100, 237, scratch, out)
    assert got is out or np.shares_memory(got, out)
    np.testing.assert_allclose(out, g[:, 100:237].T.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)
    whole = centre.block(g, 0, 300, np.empty((300, 5), np.float32), np.empty((300, 24), np.float32))
    np.testing.assert_allclose(whole, g.T.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_transpose_columns():
    from recognition.partial_fc.cpu_kernels import transpose_columns
    g = np.random.default_rng(1).standard_normal((5, 300)).astype(np.float32)
    block = transpose_columns(g, 100, 237, np.full((150, 5), np.nan, np.float32))
    np.testing.assert_array_equal(block, g[:, 100:237].T)


def test_softmax_rows_in_place():
    from recognition.partial_fc import products
    rng = np.random.default_rng(2)
    z = (20 * rng.standard_normal((4, 1000))).astype(np.float32)
    z[1, 10:] = -np.inf                     # filtered logits take no probability
    expected = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(products.softmax_rows(z), expected, rtol=1e-5, atol=1e-7)


HOT_PATH = ["partial_fc/" + name for name in (
    "operator.py", "kernels.py", "kernels_cpu.py", "kernels_ndarray.py", "products.py", "product_choice.py",
    "cpu_kernels.py", "memory_bank.py", "disk_bank.py", "sampler.py", "bank_queue.py")] + [
    "common/" + name for name in ("collective_input.py", "rows.py", "margin.py")]
BLAS_CALLS = {"matmul", "dot", "tensordot", "inner", "vdot", "einsum_path", "outer"}
# the numpy candidate's functions: the only places of the step where numpy's BLAS may be called
NUMPY_CANDIDATE = {("partial_fc/products.py", name) for name in ("numpy_logits", "numpy_embedding", "numpy_centre")}


def numpy_products_outside_the_candidate():
    """['module:line what'] of every '@' and numpy product call in the hot path outside the numpy candidate's
    functions (``mx.nd`` calls are MXNet's)."""
    found = []
    for name in HOT_PATH:
        path = os.path.join(ROOT, "recognition", name)
        tree = ast.parse(open(path).read(), path)
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (name, node.name) in NUMPY_CANDIDATE:
                allowed.update(id(child) for child in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in allowed:
                continue
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
                found.append("%s:%d '@'" % (name, node.lineno))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BLAS_CALLS:
                owner = ast.unparse(node.func.value)
                if owner not in ("mx.nd", "mxnet.nd"):
                    found.append("%s:%d %s.%s" % (name, node.lineno, owner, node.func.attr))
    return found


def test_numpy_blas_only_inside_the_numpy_candidate():
    """numpy's BLAS is one candidate kernel of the products: no '@' and no numpy product call anywhere else in
    the step's modules, and the candidate's functions exist (so the allowance is not for nothing)."""
    assert numpy_products_outside_the_candidate() == []
    from recognition.partial_fc import products
    assert all(callable(getattr(products, fn)) for _, fn in NUMPY_CANDIDATE)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_step_calls_numpy_blas_only_when_chosen(kernel, monkeypatch):
    """A CPU step (forward, backward, centre gradient and update) with every product forced to ``kernel``:
    np.matmul is called by the numpy candidate, and never otherwise."""
    import horovod.mxnet as hvd
    from collections import defaultdict
    import mxnet as mx
    from recognition.common.margin import CombinedMargin
    from recognition.common.rows import l2_normalize_rows
    from recognition.partial_fc.bank_queue import BankQueue
    from recognition.partial_fc.kernels_cpu import CPUKernels
    from recognition.partial_fc.memory_bank import HostBank
    from recognition.partial_fc.product_choice import numpy_blas_problem
    from recognition.progress import PhaseClock
    if kernel == "numpy" and numpy_blas_problem():
        pytest.skip("numpy's BLAS cannot be forced here: %s" % numpy_blas_problem())
    hvd.init()
    calls, real = [], np.matmul

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(np, "matmul", spy)
    bank = HostBank(40, 8, 0, seed=4)
    kernels = CPUKernels(mx.cpu(), scale=32.0, margin=CombinedMargin(1.0, 0.5, 0.0), interclass_filter=0.0,
                         momentum=0.9, weight_decay=5e-4, bank=bank, bank_jobs=BankQueue(threaded=False),
                         timings=defaultdict(float), cpu_products=kernel)
    rows, inv_norm = kernels.pull(None)
    xn, _ = l2_normalize_rows(np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
    kernels.forward_backward(xn, rows, inv_norm, None, np.arange(6), np.ones(6, bool), PhaseClock(defaultdict(float)))
    kernels.centre_grad()
    kernels.update(0.1, step=0)
    assert kernels.choice.kernels == dict.fromkeys(("logits", "embedding", "centre"), kernel)
    if kernel == "numpy":       # logits, embedding gradient, the unit gradient and the update's one block
        assert calls == [(6, 8), (6, 40), (40, 6), (40, 6)]
    else:
        assert calls == []
