"""Face embeddings for evaluation: one small backend interface, and the view logic written once on top of it.

A backend turns faces into raw embeddings and nothing else. It has ``batch_size``, ``input_shape`` (3, H, W),
``dim`` and ``forward(batch)``: float32 (n, 3, H, W) raw RGB 0..255, any n -> float32 (n, D), no flip, no
normalisation. Two exist:
    MXNetBackend   a symbol + params (a legacy checkpoint PREFIX,EPOCH), bound for inference
    OnnxBackend    an ONNX file (eval/onnx_backend.py, imported only when asked for)
``Embedder`` embeds each face and its horizontal flip with a backend and combines the two views the way a
protocol asks: summed raw (the .bin protocol, with InsightFace's XNorm) or each view L2-normalised first (IJB).
The command-line side (--model / --onnx, --ctx) is eval/cli.py.
"""
import os

import numpy as np

NORM_EPS = 1e-12        # floor of a norm we divide by: an all-zero embedding stays zero instead of turning NaN


# ---------------------------------------------------------------------------------------- MXNet backend
def parse_model_spec(spec):
    """'PREFIX,EPOCH' -> (prefix, epoch)."""
    prefix, _, epoch = str(spec).rpartition(",")
    if not prefix or not epoch.strip().isdigit():
        raise ValueError("model must be given as PREFIX,EPOCH (files PREFIX-symbol.json and PREFIX-EPOCH.params "
                         "with a 4-digit epoch), got %r" % (spec,))
    return prefix, int(epoch)


def checkpoint_files(spec):
    """The two files of checkpoint 'PREFIX,EPOCH'; FileNotFoundError names the first one missing."""
    prefix, epoch = parse_model_spec(spec)
    files = ("%s-symbol.json" % prefix, "%s-%04d.params" % (prefix, epoch))
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError("model file not found: %s (from %s)" % (path, spec))
    return files


def mxnet_reason(error):
    """The last line of an MXNetError's message (MXNet puts a C++ stack before it), without 'MXNetError: '."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    return lines[-1].replace("MXNetError: ", "")


def load_checkpoint(spec):
    """(symbol, arg_params, aux_params) of the legacy checkpoint 'PREFIX,EPOCH', as ``mx.model.load_checkpoint``
    gives them. A missing file, or one MXNet cannot read (damaged JSON, truncated or foreign params), raises
    FileNotFoundError / ValueError naming that file."""
    import mxnet as mx
    json_path, params_path = checkpoint_files(spec)
    try:
        symbol = mx.sym.load(json_path)
    except (mx.base.MXNetError, UnicodeDecodeError) as error:
        raise ValueError("%s is not an MXNet symbol file (a graph as JSON): %s"
                         % (json_path, mxnet_reason(error))) from None
    try:
        saved = mx.nd.load(params_path)
    except mx.base.MXNetError as error:
        raise ValueError("%s is not a readable MXNet parameter file (damaged or truncated?): %s"
                         % (params_path, mxnet_reason(error))) from None
    if not isinstance(saved, dict) or not saved or not all(k.startswith(("arg:", "aux:")) for k in saved):
        raise ValueError("%s holds no 'arg:NAME' / 'aux:NAME' parameters: not a checkpoint's parameter file"
                         % params_path)
    arg_params = {k[4:]: v for k, v in saved.items() if k.startswith("arg:")}
    aux_params = {k[4:]: v for k, v in saved.items() if k.startswith("aux:")}
    return symbol, arg_params, aux_params


def embedding_symbol(symbol):
    """The internal output ``fc1_output`` of ``symbol`` when it has one (a training graph with a loss on top),
    otherwise its single output."""
    internals = symbol.get_internals()
    if "fc1_output" in internals.list_outputs():
        return internals["fc1_output"]
    if len(symbol.list_outputs()) != 1:
        raise ValueError("the symbol has no fc1_output and %d outputs (%s); cannot tell which is the embedding"
                         % (len(symbol.list_outputs()), ", ".join(symbol.list_outputs())))
    return symbol


class MXNetBackend:
    """Raw embeddings from an MXNet symbol: an inference module bound for (batch_size, 3, H, W); a smaller
    last chunk is zero-padded to it and the padded rows dropped. Pixels go in as raw 0..255 float32 (the graph
    normalises itself)."""

    def __init__(self, symbol, arg_params, aux_params, ctx=None, batch_size=64, image_size=(112, 112), name=None):
        import mxnet as mx
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1, got %r" % (batch_size,))
        self.batch_size = int(batch_size)
        self.input_shape = (3,) + tuple(int(v) for v in image_size)
        self.context = mx.cpu() if ctx is None else ctx
        self._name = name                       # for errors: the checkpoint it came from
        self.symbol = embedding_symbol(symbol)
        if "data" not in self.symbol.list_arguments():
            raise ValueError("the embedding graph has no input named 'data' (its inputs: %s)"
                             % ", ".join(self.symbol.list_arguments()))
        self.module = None
        self.set_params(arg_params, aux_params)
        self.dim = int(np.prod(self.module.output_shapes[0][1][1:]))

    @classmethod
    def from_checkpoint(cls, spec, ctx=None, batch_size=64, image_size=(112, 112)):
        """The backend of legacy checkpoint 'PREFIX,EPOCH'; errors name a missing or unreadable file."""
        symbol, arg_params, aux_params = load_checkpoint(spec)
        return cls(symbol, arg_params, aux_params, ctx=ctx, batch_size=batch_size, image_size=image_size,
                   name=spec)

    def _bind(self):
        import mxnet as mx
        self.module = mx.mod.Module(self.symbol, data_names=["data"], label_names=None, context=self.context)
        try:
            self.module.bind(data_shapes=[("data", (self.batch_size,) + self.input_shape)], for_training=False)
        except mx.base.MXNetError as error:
            raise ValueError("%s does not take faces of %dx%d (HxW): %s"
                             % ((self._name or "the model",) + self.input_shape[1:] + (mxnet_reason(error),))) from None
        self.has_run = False

    def set_params(self, arg_params, aux_params):
        """Load new weights (e.g. the training module's, every verification); extra parameters are ignored."""
        missing = [n for n in self.symbol.list_arguments() if n != "data" and n not in arg_params]
        missing += [n for n in self.symbol.list_auxiliary_states() if n not in aux_params]
        if missing:
            raise ValueError("parameters missing for the embedding graph: %s%s"
                             % (", ".join(missing[:10]), " (model %s)" % self._name if self._name else ""))
        if self.module is None or self.has_run:
            # MXNet's CPU (MKLDNN) inference graph caches FC/conv weights (with BN folded in) at its first
            # forward and ignores later set_params; a fresh bind (~0.2 s for r50) is the reliable refresh.
            self._bind()
        import mxnet as mx
        try:
            self.module.set_params(arg_params, aux_params, allow_missing=False, force_init=True, allow_extra=True)
        except mx.base.MXNetError as error:     # parameters of other shapes: another graph, or other face sizes
            raise ValueError("the parameters of %s do not fit its graph on faces of %dx%d (HxW): %s"
                             % ((self._name or "the model",) + self.input_shape[1:] + (mxnet_reason(error),))) from None

    def forward(self, batch):
        """float32 (n, D) raw embeddings of float32 (n, 3, H, W) faces, any n."""
        import mxnet as mx
        batch = np.asarray(batch, np.float32)
        count = len(batch)
        self.has_run = True
        outputs = []
        padded = np.zeros((self.batch_size,) + self.input_shape, np.float32)
        for start in range(0, count, self.batch_size):
            chunk = batch[start:start + self.batch_size]
            if len(chunk) < self.batch_size:
                padded[:len(chunk)] = chunk
                chunk = padded                       # padding rows: their outputs are dropped below
            self.module.forward(mx.io.DataBatch(data=[mx.nd.array(chunk)]), is_train=False)
            # copied off the module without waiting, so every chunk is queued before the first result is read
            outputs.append(self.module.get_outputs()[0].copyto(mx.cpu()))
        out = np.empty((count, self.dim), np.float32)
        for start, output in zip(range(0, count, self.batch_size), outputs):
            rows = min(self.batch_size, count - start)
            out[start:start + rows] = output.asnumpy().reshape(self.batch_size, -1)[:rows]
        return out


def onnx_backend(path, batch_size=64, image_size=(112, 112)):
    """eval/onnx_backend.py's OnnxBackend for ``path``, imported here so that MXNet-only use needs no onnx."""
    if not os.path.isfile(path):
        raise FileNotFoundError("ONNX model not found: %s" % path)
    from eval.onnx_backend import OnnxBackend
    return OnnxBackend(path, batch_size=batch_size, image_size=tuple(image_size))


# ---------------------------------------------------------------------------------------------- views
def _row_norms(a):
    """float64 L2 norm of every row of float32 ``a`` (no BLAS: einsum with an explicit float64 accumulator)."""
    return np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))


class Embedder:
    """Embeddings of uint8 RGB NCHW faces combined over the views f(x) and f(x flipped along the width).

    ``Embedder(symbol, arg_params, aux_params, ctx, batch_size, image_size)`` wraps an MXNetBackend (what the
    training loop uses); ``from_checkpoint``, ``from_onnx`` and ``from_backend`` wrap any other backend.
    """

    def __init__(self, symbol, arg_params, aux_params, ctx=None, batch_size=64, image_size=(112, 112)):
        self._attach(MXNetBackend(symbol, arg_params, aux_params, ctx=ctx, batch_size=batch_size,
                                  image_size=image_size))

    def _attach(self, backend):
        self.backend = backend
        self.batch_size = int(backend.batch_size)
        self.input_shape = tuple(backend.input_shape)
        self.dim = int(backend.dim)
        self.last_xnorm = float("nan")

    @classmethod
    def from_backend(cls, backend):
        """An Embedder over any object with ``batch_size``, ``input_shape``, ``dim`` and ``forward``."""
        embedder = cls.__new__(cls)
        embedder._attach(backend)
        return embedder

    @classmethod
    def from_checkpoint(cls, spec, ctx=None, batch_size=64, image_size=(112, 112)):
        """An Embedder for the legacy checkpoint 'PREFIX,EPOCH'; FileNotFoundError names a missing file."""
        return cls.from_backend(MXNetBackend.from_checkpoint(spec, ctx=ctx, batch_size=batch_size,
                                                             image_size=image_size))

    @classmethod
    def from_onnx(cls, path, batch_size=64, image_size=(112, 112)):
        """An Embedder for the ONNX model at ``path``."""
        return cls.from_backend(onnx_backend(path, batch_size=batch_size, image_size=image_size))

    def set_params(self, arg_params, aux_params):
        """New weights for an MXNet backend (the training loop refreshes them before every verification)."""
        if not hasattr(self.backend, "set_params"):
            raise TypeError("a %s takes no new parameters" % type(self.backend).__name__)
        self.backend.set_params(arg_params, aux_params)

    def _check(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError("images must be (N, %d, %d, %d), got %s" % (self.input_shape + (images.shape,)))
        return images

    def embed_batch(self, images, flip=True, normalize_views=False):
        """(features float32 (n, D), view norms float64 (n, views)) for uint8 faces (n, 3, H, W).

        features: f(x) + f(flip x) with ``flip``, else f(x); with ``normalize_views`` every view is L2-normalised
        before the sum. view norms: the raw norm of each view (column 0: the image, 1: its flip)."""
        images = self._check(images)
        count = len(images)
        views = np.empty(((2 if flip else 1) * count,) + self.input_shape, np.float32)
        views[:count] = images
        if flip:
            views[count:] = images[..., ::-1]
        raw = self.backend.forward(views)                   # both views in one call: fewer padded batches
        if raw.shape != (len(views), self.dim):
            raise ValueError("the backend returned %s for %d faces, expected (%d, %d)"
                             % (raw.shape, len(views), len(views), self.dim))
        norms = _row_norms(raw)
        if normalize_views:
            raw = raw / np.maximum(norms, NORM_EPS).astype(np.float32)[:, None]
        features = raw[:count] + raw[count:] if flip else raw[:count]
        return np.ascontiguousarray(features, np.float32), norms.reshape(-1, count).T

    def embed(self, images, progress=None, flip=True, normalize_views=False):
        """np.float32 (N, D) ``embed_batch`` features of uint8 faces (N, 3, H, W), batch by batch; ``progress(k)``
        is called after every batch of k faces. Sets ``last_xnorm``: InsightFace's XNorm, the mean raw norm of
        the single views (each image and its flip), before they are combined."""
        images = self._check(images)
        out = np.empty((len(images), self.dim), np.float32)
        norm_sum, norm_count = 0.0, 0
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out[start:start + len(chunk)], norms = self.embed_batch(chunk, flip, normalize_views)
            norm_sum, norm_count = norm_sum + norms.sum(), norm_count + norms.size
            if progress is not None:
                progress(len(chunk))
        self.last_xnorm = norm_sum / norm_count if norm_count else float("nan")
        return out
