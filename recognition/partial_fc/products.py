"""The CPU head's matrix products and softmax through MXNet's oneDNN kernels, on NumPy arrays in place.

oneDNN picks its kernels for the CPU it runs on; numpy's bundled OpenBLAS may not know a newer CPU and fall back
to a generic core several times slower (``utils/blas_check.py``), and numpy's float32 ``exp`` is about
3x slower than oneDNN's softmax whole. So nothing of a training step goes through numpy's BLAS.

``FullyConnected(data, weight)`` is data . weight^T: both operands contract over their last (contiguous) axis.
With X the (B x D) embeddings (times the scale s), W the (k x D) sampled unit centres, Z = X . W^T the (B x k)
logits and G = d loss / d Z:

    Z             = FullyConnected(X, W)                 forward, softmax over each row of Z (oneDNN)
    d loss / d X  = G . W, the data gradient of that same FullyConnected (MXNet autograd, X the only variable)
    d loss / d W[lo:hi] = FullyConnected(G[:, lo:hi]^T, X^T)   a block of rows, G's columns transposed in cache

so no (k x D) operand is ever copied or transposed.
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


def softmax_rows(a):
    """Softmax of each row of the C-contiguous float32 matrix ``a``, in place (oneDNN). A row that is all -inf
    comes back as NaN: the caller handles such rows."""
    view = nd_view(a)
    mx.nd.softmax(view, axis=-1, out=view).wait_to_read()
    return a


class LogitsProduct:
    """Z = X . W^T now, and d loss / d X = G . W later (``data_grad``), for one step.

    The forward is recorded by MXNet's autograd with X the only variable, so the backward runs oneDNN's data
    gradient alone (no gradient for the k x D centres is computed).
    """

    def __init__(self, embeddings, unit_rows, out):
        self._x = mx.nd.array(embeddings)
        self._x_grad = mx.nd.zeros(embeddings.shape)
        mx.autograd.mark_variables([self._x], [self._x_grad])
        with mx.autograd.record(train_mode=False):
            self._logits = mx.nd.FullyConnected(self._x, nd_view(unit_rows), no_bias=True,
                                                num_hidden=unit_rows.shape[0], out=nd_view(out))
        self._logits.wait_to_read()
        self._out = out

    def data_grad(self):
        """d loss / d X (B x D NumPy), once ``out`` holds d loss / d Z (the caller overwrote it in place)."""
        self._logits.backward(out_grad=nd_view(self._out))
        grad = self._x_grad.asnumpy()
        self._logits = self._x = None     # drop the recorded graph
        return grad


def transposed_nd(a):
    """a^T as a fresh C-contiguous NDArray (for the small (B x D) operand of the centre-gradient product)."""
    return mx.nd.array(np.ascontiguousarray(a.T))
