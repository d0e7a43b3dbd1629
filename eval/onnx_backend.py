"""Raw face embeddings from an ONNX model in ONNX Runtime: the evaluation backend for exported models.

    backend = OnnxBackend("r50.onnx", batch_size=64)
    embeddings = backend.forward(faces)       # float32 (n, 3, H, W) raw RGB 0..255 -> float32 (n, D)

The model takes one float32 input (batch, 3, H, W) of raw RGB pixels (it normalises them itself, as the
models of tools/export_onnx.py do) and gives the embedding as ``fc1_output`` (or as its only output). A dynamic
batch dimension is fed up to ``batch_size`` faces a run; a fixed one is fed exactly its size, the last chunk
zero-padded and the padded rows dropped. No flip and no normalisation here (eval/embedding.py does the views).
"""
import os

import numpy as np

OUTPUT_NAME = "fc1_output"


class OnnxBackend:
    """``batch_size``, ``input_shape`` (3, H, W), ``dim`` and ``forward(batch)`` for the ONNX model at ``path``.

    ``batch_size`` is the model's own when its batch dimension is fixed. ``providers`` are ONNX Runtime
    execution providers (default: the CPU); ``threads`` its intra-op threads (0: ONNX Runtime's default)."""

    def __init__(self, path, batch_size=64, image_size=(112, 112), providers=None, threads=0):
        import onnxruntime as ort
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1, got %r" % (batch_size,))
        if not os.path.isfile(path):
            raise FileNotFoundError("ONNX model not found: %s" % path)
        if not os.access(path, os.R_OK):
            raise PermissionError("ONNX model not readable: %s" % path)
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as error:      # ONNX Runtime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise ValueError("%s cannot be loaded as an ONNX model: %s" % (path, error)) from error
        self.input_shape = (3,) + tuple(int(v) for v in image_size)
        self.input_name, fixed_batch = self._check_input()
        self.output_name = self._pick_output()
        self.fixed_batch = fixed_batch is not None
        self.batch_size = fixed_batch if self.fixed_batch else int(batch_size)
        output = next(o for o in self.session.get_outputs() if o.name == self.output_name)
        declared = output.shape[-1] if len(output.shape) == 2 else None
        if isinstance(declared, int):
            self.dim = declared
        else:                                   # undeclared: one run of a blank batch tells
            probe = np.zeros((self.batch_size if self.fixed_batch else 1,) + self.input_shape, np.float32)
            self.dim = int(self._run(probe).shape[1])

    def _check_input(self):
        """(the input's name, its fixed batch size or None); ValueError unless it is float (batch, 3, H, W)."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError("%s takes %d inputs (%s); an embedding model takes one image batch"
                             % (self.path, len(inputs), ", ".join(i.name for i in inputs)))
        tensor = inputs[0]
        if tensor.type != "tensor(float)":
            raise ValueError("%s: input %s is %s, expected tensor(float)" % (self.path, tensor.name, tensor.type))
        shape = list(tensor.shape)
        fixed = [d if isinstance(d, int) else None for d in shape]
        if len(shape) != 4 or any(f is not None and f != want for f, want in zip(fixed[1:], self.input_shape)):
            raise ValueError("%s: input %s has shape %s, expected (batch, %d, %d, %d)"
                             % ((self.path, tensor.name, shape) + self.input_shape))
        return tensor.name, fixed[0]

    def _pick_output(self):
        """fc1_output, or the only output."""
        names = [o.name for o in self.session.get_outputs()]
        if OUTPUT_NAME in names:
            return OUTPUT_NAME
        if len(names) == 1:
            return names[0]
        raise ValueError("%s has %d outputs (%s) and none named %s; cannot tell which is the embedding"
                         % (self.path, len(names), ", ".join(names), OUTPUT_NAME))

    def _run(self, batch):
        """One ONNX Runtime run: (len(batch), D)."""
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return out.reshape(len(batch), -1)

    def forward(self, batch):
        """float32 (n, D) raw embeddings of ``batch``, float32 (n, 3, H, W) raw RGB 0..255, any n."""
        batch = np.ascontiguousarray(batch, np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError("faces must be (n, %d, %d, %d), got %s" % (self.input_shape + (batch.shape,)))
        out = np.empty((len(batch), self.dim), np.float32)
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            count = len(chunk)
            if self.fixed_batch and count < self.batch_size:
                padded = np.zeros((self.batch_size,) + self.input_shape, np.float32)
                padded[:count] = chunk
                chunk = padded                  # padding rows: their outputs are dropped
            out[start:start + count] = self._run(chunk)[:count]
        return out
