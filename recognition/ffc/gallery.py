"""FFC's gallery net: a forward-only copy of the probe backbone that follows it by an exponential moving average.

It starts equal to the probe and never receives gradients. Once per step, before its forward passes, every
weight moves towards the probe's: ``g <- alpha * g + (1 - alpha) * p`` (BatchNorm's moving statistics are not
weights: the gallery runs in training mode, on batch statistics, as FFC's reference does, so they are unused).
The EMA runs on float32 master copies, so a float16 trunk does not round the small (1 - alpha) steps away.
"""
import numpy as np
import mxnet as mx

from recognition.backbone import IMAGE_SHAPE


class GalleryNet:
    """The gallery module of ``symbol`` bound for ``batch_size`` rows, forward only."""

    def __init__(self, symbol, ctx, batch_size, arg_params, aux_params):
        self.module = mx.mod.Module(symbol, data_names=["data"], label_names=None, context=ctx)
        # Training-mode forwards (batch statistics) with no gradients. A graph that needs no gradient at all is
        # rewritten by MXNet's CPU subgraph pass for inference (BatchNorm folded into the convolutions with its
        # MOVING statistics, weights cached at the first forward), which would ignore both the batch statistics
        # and later weight updates; one parameter keeps a gradient buffer, so the graph stays a training one. It is
        # the last argument in topological order (next to the output, e.g. fc1_beta): its backward pass is a few
        # ops and keeps no activations of the trunk alive (an early one kept them all: mbf at batch 48, 2.3 GB
        # against 0.6 GB per rank).
        names = [n for n in symbol.list_arguments() if n != "data"]
        keeper = names[-1]
        self.module.bind(data_shapes=[("data", (int(batch_size),) + IMAGE_SHAPE)], for_training=True,
                         grad_req={n: "write" if n == keeper else "null" for n in names})
        self.module.init_params(arg_params=arg_params, aux_params=aux_params, allow_missing=False, force_init=True)
        self._live = live_param_arrays(self.module)
        # float32 weights are their own master; float16 ones get a float32 copy
        self._master = {name: a if a.dtype == np.float32 else a.astype("float32")
                        for name, a in self._live.items()}

    def embed(self, data):
        """Embeddings (NDArray, (batch_size, E)) of ``data``, in training mode."""
        self.module.forward(mx.io.DataBatch(data=[data]), is_train=True)
        return self.module.get_outputs()[0]

    def follow(self, probe_arrays, alpha):
        """One EMA step towards ``probe_arrays`` ({name: NDArray}, the probe's live weights)."""
        for name, master in self._master.items():
            probe = probe_arrays[name]
            if probe.dtype != master.dtype:
                probe = probe.astype(master.dtype)
            master *= alpha
            master += (1.0 - alpha) * probe
            live = self._live[name]
            if live is not master:
                live[:] = master.astype(live.dtype)

    def get_params(self):
        """(arg, aux) on the CPU: the float32 master weights and the module's auxiliary states."""
        _, aux = self.module.get_params()
        return {k: v.copyto(mx.cpu()) for k, v in self._master.items()}, aux

    def set_params(self, arg, aux):
        missing = sorted(set(self._master) - set(arg))
        if missing:
            raise ValueError("gallery parameters lack %s" % ", ".join(missing[:10]))
        live_arg = {k: v.astype(self._live[k].dtype) for k, v in arg.items() if k in self._live}
        self.module.set_params(live_arg, aux, allow_missing=False, force_init=True, allow_extra=True)
        for name, master in self._master.items():
            if master is not self._live[name]:
                master[:] = arg[name].astype(master.dtype)


def live_param_arrays(module):
    """{name: NDArray} of a bound module's weights as its executor holds them (no copy)."""
    group = module._exec_group
    return {name: arrays[0] for name, arrays in zip(group.param_names, group.param_arrays)}
