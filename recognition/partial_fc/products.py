"""The head's matrix products on the CPU, all through MXNet's oneDNN ``FullyConnected``, on NumPy arrays in place.

oneDNN is the fastest matrix product this project has on a CPU, and it picks its kernels for the CPU it runs
on; numpy's bundled OpenBLAS may not know a newer CPU and fall back to a generic core several times slower
(``recognition/blas_check.py``). So no product of a training step goes through numpy's BLAS.

``FullyConnected(data, weight)`` is data . weight^T: both operands contract over their last (contiguous) axis.
With the cosine matrix held transposed, one row per sampled centre (k x B), every product of the step fits:

    logits^T  (k x B) = FullyConnected(W_unit (k x D), X (B x D))                      forward
    dL/dX     (B x D) = G^T . W_unit, the weight gradient of that same FullyConnected    (MXNet autograd)
    dL/dW_unit block (n x D) = FullyConnected(G[lo:hi] (n x B), X^T (D x B))           a contiguous row block

where G (k x B) is d loss / d logits^T. None of them copies or transposes a (k x D) or (k x B) operand.
"""
import numpy as np
import mxnet as mx


def nd_view(array):
    """An NDArray sharing ``array``'s memory (C-contiguous float32). Only the view handed to MXNet is made
    read-only (``from_numpy`` does that), ``array`` itself stays writable."""
    return mx.nd.from_numpy(array.view(), zero_copy=True)


def rows_times(data, weight_nd, out):
    """out (n x m) = data (n x D) . weight^T, with ``weight_nd`` an (m x D) NDArray; waits for the result."""
    out_nd = nd_view(out)
    mx.nd.FullyConnected(nd_view(data), weight_nd, no_bias=True, num_hidden=out.shape[1], out=out_nd)
    out_nd.wait_to_read()
    return out


class CosineProduct:
    """logits^T = W_unit . X^T now, and d loss / d X = G^T . W_unit later (``embedding_grad``), for one step.

    The forward is recorded by MXNet's autograd with X the only variable, so the backward runs oneDNN's weight
    gradient alone (no gradient for the k x D centres is computed).
    """

    def __init__(self, unit_rows, embeddings, out):
        self.batch, dim = embeddings.shape
        self._x = mx.nd.array(embeddings)
        self._x_grad = mx.nd.zeros((self.batch, dim))
        mx.autograd.mark_variables([self._x], [self._x_grad])
        with mx.autograd.record(train_mode=False):
            self._cos = mx.nd.FullyConnected(nd_view(unit_rows), self._x, no_bias=True, num_hidden=self.batch,
                                             out=nd_view(out))
        self._cos.wait_to_read()
        self._out = out

    def embedding_grad(self):
        """d loss / d X (B x D NumPy), once ``out`` holds d loss / d logits^T (the caller overwrote it in place)."""
        self._cos.backward(out_grad=nd_view(self._out))
        grad = self._x_grad.asnumpy()
        self._cos = self._x = None     # drop the recorded graph
        return grad


def transposed_nd(a):
    """a^T as a fresh C-contiguous NDArray (for the small (B x D) operand of the centre-gradient product)."""
    return mx.nd.array(np.ascontiguousarray(a.T))
