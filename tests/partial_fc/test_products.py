"""The head's oneDNN products against NumPy float64, and no numpy BLAS call in the CPU hot path."""
import ast
import os

import numpy as np

from tests.harness import ROOT


def test_logits_product_and_its_data_gradient():
    from recognition.partial_fc import products
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 24)).astype(np.float32), rng.standard_normal((300, 24)).astype(np.float32)
    out = np.full((5, 300), np.nan, np.float32)
    product = products.LogitsProduct(x, w, out)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((5, 300)).astype(np.float32)
    out[:] = g                              # the caller overwrites the logits with their gradient in place
    np.testing.assert_allclose(product.data_grad(), g.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)
    assert out.flags.writeable and w.flags.writeable      # only the views handed to MXNet became read-only


def test_centre_gradient_block_from_transposed_columns():
    from recognition.partial_fc import products
    from recognition.partial_fc.cpu_kernels import transpose_columns
    rng = np.random.default_rng(1)
    g, x = rng.standard_normal((5, 300)).astype(np.float32), rng.standard_normal((5, 24)).astype(np.float32)
    block = transpose_columns(g, 100, 237, np.full((150, 5), np.nan, np.float32))
    np.testing.assert_array_equal(block, g[:, 100:237].T)
    out = np.empty((137, 24), np.float32)
    products.rows_times(block, products.transposed_nd(x), out)
    np.testing.assert_allclose(out, g[:, 100:237].T.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_softmax_rows_in_place():
    from recognition.partial_fc import products
    rng = np.random.default_rng(2)
    z = (20 * rng.standard_normal((4, 1000))).astype(np.float32)
    z[1, 10:] = -np.inf                     # filtered logits take no probability
    expected = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(products.softmax_rows(z), expected, rtol=1e-5, atol=1e-7)


HOT_PATH = ["partial_fc/" + name for name in (
    "operator.py", "kernels.py", "kernels_cpu.py", "kernels_ndarray.py", "products.py", "cpu_kernels.py",
    "memory_bank.py", "disk_bank.py", "sampler.py", "bank_queue.py")] + [
    "common/" + name for name in ("collective_input.py", "rows.py", "margin.py")]
BLAS_CALLS = {"matmul", "dot", "tensordot", "inner", "vdot", "einsum_path", "outer"}


def test_no_numpy_blas_product_in_the_training_step():
    """The CPU step must not depend on numpy's BLAS build: no '@' and no numpy product call in these modules
    (``mx.nd.dot`` of the NDArray kernels, the GPU path, is MXNet's)."""
    found = []
    for name in HOT_PATH:
        path = os.path.join(ROOT, "recognition", name)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
                found.append("%s:%d '@'" % (name, node.lineno))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BLAS_CALLS:
                owner = ast.unparse(node.func.value)
                if owner not in ("mx.nd", "mxnet.nd"):
                    found.append("%s:%d %s.%s" % (name, node.lineno, owner, node.func.attr))
    assert not found, found
