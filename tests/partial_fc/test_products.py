"""The head's oneDNN products against NumPy float64, and no numpy BLAS call in the CPU hot path."""
import ast
import os

import numpy as np

from tests.harness import ROOT


def test_cosine_product_and_its_embedding_gradient():
    from recognition.partial_fc import products
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((300, 24)).astype(np.float32), rng.standard_normal((5, 24)).astype(np.float32)
    out = np.full((300, 5), np.nan, np.float32)
    product = products.CosineProduct(w, x, out)
    np.testing.assert_allclose(out, w.astype(np.float64) @ x.T, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((300, 5)).astype(np.float32)
    out[:] = g                              # the caller overwrites the cosines with their gradient in place
    np.testing.assert_allclose(product.embedding_grad(), g.T.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)
    assert out.flags.writeable and w.flags.writeable      # only the views handed to MXNet became read-only


def test_row_block_times_a_transposed_operand():
    from recognition.partial_fc import products
    rng = np.random.default_rng(1)
    g, x = rng.standard_normal((300, 5)).astype(np.float32), rng.standard_normal((5, 24)).astype(np.float32)
    x_t = products.transposed_nd(x)
    out = np.empty((100, 24), np.float32)
    products.rows_times(g[100:200], x_t, out)      # a contiguous row block, no copy
    np.testing.assert_allclose(out, g[100:200].astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


HOT_PATH = ["operator.py", "products.py", "cpu_kernels.py", "memory_bank.py", "disk_bank.py", "sampler.py",
            "margin.py", "bank_queue.py"]
BLAS_CALLS = {"matmul", "dot", "tensordot", "inner", "vdot", "einsum_path", "outer"}


def test_no_numpy_blas_product_in_the_training_step():
    """The CPU step must not depend on numpy's BLAS build: no '@' and no numpy product call in these modules
    (``mx.nd.dot`` of the NDArray kernels, the GPU path, is MXNet's)."""
    found = []
    for name in HOT_PATH:
        path = os.path.join(ROOT, "recognition", "partial_fc", name)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
                found.append("%s:%d '@'" % (name, node.lineno))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in BLAS_CALLS:
                owner = ast.unparse(node.func.value)
                if owner not in ("mx.nd", "mxnet.nd"):
                    found.append("%s:%d %s.%s" % (name, node.lineno, owner, node.func.attr))
    assert not found, found
