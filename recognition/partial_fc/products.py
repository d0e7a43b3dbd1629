"""The CPU head's three matrix products, each in several kernels, and its softmax (oneDNN), on NumPy arrays.

With X the (B x D) embeddings (times the scale s), W the (k x D) sampled unit centres, Z = X . W^T the (B x k)
logits and G = d loss / d Z (written over Z in place), one step needs

    logits      Z = X . W^T
    embedding   d loss / d X = G . W
    centre      d loss / d W[lo:hi] = G[:, lo:hi]^T . X     a block of rows at a time (``kernels_cpu.py``)

Which kernel is fastest depends on the CPU (``product_choice.py`` times them at start-up), so each product
exists in three kernels, every one exact to float32 rounding and none copying a (k x D) operand:

    onednn  MXNet's oneDNN FullyConnected (data . weight^T, both contracting over their contiguous axis): the
            logits as they are; the embedding gradient as the data gradient of that same recorded product
            (MXNet autograd, X the only variable), so it needs the oneDNN logits; the centre gradient on G's
            block columns transposed in cache, times X^T
    dot     MXNet's ``nd.dot`` (its OpenBLAS): X . W^T with transpose_b, G . W, and the transposed block . X
    numpy   numpy's BLAS (``np.matmul``) on the same arrays; the centre block straight from G's strided columns.
            Only for a numpy whose OpenBLAS runs a core made for this CPU (``product_choice.numpy_blas_problem``)

The softmax is oneDNN's (numpy's float32 ``exp`` is about 3x slower than oneDNN's softmax whole).
"""
import numpy as np
import mxnet as mx

from recognition.partial_fc.cpu_kernels import transpose_columns

KERNELS = ("onednn", "dot", "numpy")


def nd_view(array):
    """An NDArray sharing ``array``'s memory (C-contiguous float32). Only the view handed to MXNet is made
    read-only (``from_numpy`` does that), ``array`` itself stays writable."""
    return mx.nd.from_numpy(array.view(), zero_copy=True)


def rows_times(data, weight_nd, out):
    """out (n x m) = data (n x D) . weight^T, with ``weight_nd`` an (m x D) NDArray (oneDNN); waits for it."""
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


def transposed_nd(a):
    """a^T as a fresh C-contiguous NDArray (for the small (B x D) operand of the centre-gradient product)."""
    return mx.nd.array(np.ascontiguousarray(a.T))


def numpy_logits(x, unit, out):
    """Z = X . W^T by numpy's BLAS (the numpy candidate)."""
    return np.matmul(x, unit.T, out=out)


def numpy_embedding(grad, unit, out):
    """G . W by numpy's BLAS (the numpy candidate)."""
    return np.matmul(grad, unit, out=out)


def numpy_centre(grad, lo, hi, x, out):
    """G[:, lo:hi]^T . X by numpy's BLAS, G's columns read in place (the numpy candidate)."""
    return np.matmul(grad[:, lo:hi].T, x, out=out)


class LogitsProduct:
    """Z = X . W^T now, into ``out``, and d loss / d X = G . W later (``data_grad``), once the caller wrote G
    over ``out``; ``logits`` and ``embedding`` name their kernels (``KERNELS``).

    With the oneDNN embedding gradient the forward is recorded by MXNet's autograd with X the only variable, so
    the backward runs oneDNN's data gradient alone (no gradient for the k x D centres is computed).
    """

    def __init__(self, embeddings, unit_rows, out, logits="onednn", embedding="onednn"):
        if embedding == "onednn" and logits != "onednn":
            raise ValueError("the oneDNN embedding gradient is the backward of the oneDNN logits, got logits %r"
                             % (logits,))
        self._unit, self._out, self._kernel, self._graph = unit_rows, out, embedding, None
        if embedding == "onednn":
            x = mx.nd.array(embeddings)
            x_grad = mx.nd.zeros(embeddings.shape)
            mx.autograd.mark_variables([x], [x_grad])
            with mx.autograd.record(train_mode=False):
                z = mx.nd.FullyConnected(x, nd_view(unit_rows), no_bias=True, num_hidden=unit_rows.shape[0],
                                         out=nd_view(out))
            z.wait_to_read()
            self._graph = (z, x, x_grad)
        elif logits == "onednn":
            rows_times(embeddings, nd_view(unit_rows), out)
        elif logits == "dot":
            mx.nd.dot(nd_view(embeddings), nd_view(unit_rows), transpose_b=True, out=nd_view(out)).wait_to_read()
        elif logits == "numpy":
            numpy_logits(embeddings, unit_rows, out)
        else:
            raise ValueError("unknown logits kernel %r (one of %s)" % (logits, ", ".join(KERNELS)))
        if embedding not in KERNELS:
            raise ValueError("unknown embedding-gradient kernel %r (one of %s)" % (embedding, ", ".join(KERNELS)))

    def data_grad(self):
        """d loss / d X (B x D NumPy), once ``out`` holds d loss / d Z (the caller overwrote it in place)."""
        if self._kernel == "onednn":
            z, _, x_grad = self._graph
            z.backward(out_grad=nd_view(self._out))
            self._graph = None          # drop the recorded graph
            return x_grad.asnumpy()
        grad = np.empty((self._out.shape[0], self._unit.shape[1]), np.float32)
        if self._kernel == "dot":
            mx.nd.dot(nd_view(self._out), nd_view(self._unit), out=nd_view(grad)).wait_to_read()
        else:
            numpy_embedding(self._out, self._unit, grad)
        return grad


class CentreProduct:
    """d loss / d W[lo:hi] = G[:, lo:hi]^T . X for one update (one X), a block of rows at a time, in the
    ``kernel`` named (``KERNELS``)."""

    def __init__(self, x, kernel="onednn"):
        if kernel not in KERNELS:
            raise ValueError("unknown centre-gradient kernel %r (one of %s)" % (kernel, ", ".join(KERNELS)))
        self.kernel = kernel
        # the small (B x D) operand, laid out once for the kernel: X^T for FullyConnected, X for the others
        self._x = {"onednn": transposed_nd, "dot": mx.nd.array, "numpy": np.ascontiguousarray}[kernel](x)

    def block(self, grad, lo, hi, scratch, out):
        """out (hi - lo x D) = G[:, lo:hi]^T . X; ``scratch`` (at least hi - lo x B floats) holds the transposed
        columns for the MXNet kernels."""
        if self.kernel == "numpy":
            return numpy_centre(grad, lo, hi, self._x, out)
        block_t = transpose_columns(grad, lo, hi, scratch)
        if self.kernel == "onednn":
            return rows_times(block_t, self._x, out)
        mx.nd.dot(nd_view(block_t), self._x, out=nd_view(out)).wait_to_read()
        return out
