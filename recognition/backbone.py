"""The trained network (the "probe" in FFC's words): a backbone symbol in an ``mx.mod.Module`` with its optimizer.

A training method drives it with ``forward`` -> ``backward`` (one or more times) -> ``update``. The gradient a
method passes to ``backward`` is d(global loss)/d(this rank's embeddings), where the global loss is the one every
rank reports (a mean over the whole global batch); the backbone gradient of that loss is then the SUM over ranks
of the per-rank gradients. Horovod's DistributedOptimizer AVERAGES them, so the optimizer's ``rescale_grad`` is the
world size: the two together give exactly the sum. Float16 loss scaling (``loss_scale.py``) multiplies the
gradient entering ``backward`` and divides it out through the same ``rescale_grad``.
"""
import logging
import warnings

import numpy as np
import mxnet as mx

from recognition import dist
from recognition.loss_scale import DynamicLossScaler
from recognition.dist import on_every_rank
from recognition.pretrained import load_pretrained
from recognition.pretrained_graph import backbone_options, startup_check

log = logging.getLogger("recognition.train")

IMAGE_SHAPE = (3, 112, 112)


def build_symbol(cfg):
    """The backbone symbol the config names (embedding output ``fc1``); with ``--pretrained``, as the checkpoint's
    graph has its layers where it differs (``pretrained_graph.backbone_options``)."""
    import symbols
    options = dict(embedding_size=cfg.embedding_size, fp16=cfg.fp16, dropout=cfg.dropout, act_type=cfg.act_type,
                   bn_eps=cfg.bn_eps)
    if cfg.pretrained:
        options = on_every_rank(lambda: backbone_options(cfg.pretrained, cfg.network, options), "backbone graph")
    return symbols.get_symbol(cfg.network, **options)


def broadcast_params(arg, aux, prefix):
    """Rank 0's parameter values on every rank (in place on the dicts' NDArrays)."""
    if dist.size() > 1:
        import horovod.mxnet as hvd
        hvd.broadcast_parameters(arg, root_rank=0, prefix=prefix + "arg.")
        hvd.broadcast_parameters(aux, root_rank=0, prefix=prefix + "aux.")


class Backbone:
    """The backbone module, its SGD optimizer (Horovod-distributed) and the optional float16 loss scaler.

    It starts from Xavier initialisation, or from the legacy checkpoint ``cfg.pretrained`` ('PREFIX,EPOCH',
    ``recognition/pretrained.py``), loaded on every rank; then rank 0's values are broadcast.

    ``batch_size`` is the number of rows one forward takes on this rank. ``accumulate=True`` binds the gradients
    with ``grad_req='add'`` so several backward passes of one step add up (FFC runs two); ``update`` then applies
    the sum and clears it.
    """

    def __init__(self, cfg, ctx, batch_size, accumulate=False):
        self.cfg, self.ctx, self.batch_size = cfg, ctx, int(batch_size)
        self.size = dist.size()
        self.symbol = build_symbol(cfg)
        self.accumulate = bool(accumulate)
        module = mx.mod.Module(self.symbol, data_names=["data"], label_names=None, context=ctx)
        module.bind(data_shapes=[("data", (self.batch_size,) + IMAGE_SHAPE)], for_training=True,
                    grad_req="add" if self.accumulate else "write")
        mx.random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        module.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
        self.pretrained_check = None
        if cfg.pretrained:   # before any training method sees the backbone (FFC copies it at attach)
            arg, aux = module.get_params()
            partial = bool(cfg.pretrained_partial)
            match = on_every_rank(lambda: load_pretrained(cfg.pretrained, arg, aux, partial, cfg.network), "backbone")
            module.set_params(arg, aux)
            # rank 0 runs the file's own graph against the backbone: the figure tools/check_pretrained.py prints
            self.pretrained_check = on_every_rank(lambda: startup_check(cfg.pretrained, match, self.symbol, arg, aux,
                                                                        ctx), "pretrained check")
        if self.size > 1:   # identical start everywhere, whatever each rank's initialiser did
            arg, aux = module.get_params()
            broadcast_params(arg, aux, prefix="")
            module.set_params(arg, aux)
        # rescale_grad = world size: see the module docstring
        self._sgd = mx.optimizer.SGD(learning_rate=cfg.lr, momentum=cfg.momentum, wd=cfg.weight_decay,
                                     rescale_grad=float(self.size), multi_precision=bool(cfg.fp16))
        opt = self._sgd
        if self.size > 1:
            import horovod.mxnet as hvd
            opt = hvd.DistributedOptimizer(opt)
        self._rescale_grad = self._sgd.rescale_grad      # read after Horovod, which may adjust it
        use_scaler = cfg.loss_scale == "dynamic" or (cfg.loss_scale == "auto" and cfg.fp16)
        self.scaler = DynamicLossScaler() if use_scaler else None
        with warnings.catch_warnings():   # MXNet expects rescale_grad = 1/batch; ours is deliberate (above)
            warnings.filterwarnings("ignore", message="Optimizer created manually")
            module.init_optimizer(kvstore=None, optimizer=opt)
        self.module = module
        if self.accumulate:
            self.zero_grad()

    # ------------------------------------------------------------------------------------------ a step
    def forward(self, data):
        """Embeddings (NDArray, (batch_size, E)) of ``data`` in training mode (batch statistics, dropout)."""
        self.module.forward(mx.io.DataBatch(data=[data]), is_train=True)
        return self.module.get_outputs()[0]

    def backward(self, grad):
        """Back-propagate d(loss)/d(embeddings) of the last forward (times the loss scale, if any)."""
        if self.scaler is not None:
            grad = grad * self.scaler.scale
        self.module.backward(out_grads=[grad])

    def _grads(self):
        return [g for per_device in self.module._exec_group.grad_arrays for g in per_device if g is not None]

    def zero_grad(self):
        for g in self._grads():
            g[:] = 0

    def update(self, lr):
        """One SGD step at rate ``lr`` with the gradients of this step's backward passes. Returns False when a
        float16 overflow (on any rank) made every rank skip it."""
        self.module._optimizer.set_learning_rate(lr)
        skip = False
        if self.scaler is not None:
            skip = self.scaler.update(self.scaler.gradients_overflowed(self._grads()))
            self._sgd.rescale_grad = self._rescale_grad / self.scaler.scale
        if skip:
            log.warning("rank %d: float16 gradient overflow, backbone update skipped, loss scale now %g",
                        dist.rank(), self.scaler.scale)
        else:
            self.module.update()
        if self.accumulate:
            self.zero_grad()
        return not skip

    # ------------------------------------------------------------------------------------------- state
    def get_params(self):
        """(arg, aux): the parameters and BatchNorm moving statistics after every step queued so far (the module's
        own dicts, refreshed from the executor on every call; copy them before changing them).

        MXNet's BatchNorm updates its moving statistics in the BACKWARD pass, in arrays that op declares only as
        inputs, so the engine does not order a later read after it: right after a step, a copy saw some layers
        before that step's update and some after, as timing had it (a verification, which reads at once, changed
        what the checkpoint after it saved). Hence the wait. And Module.get_params re-reads the executor only
        after update(), though forward/backward change the statistics too: always re-read."""
        mx.nd.waitall()
        self.module._sync_params_from_devices()
        return self.module.get_params()

    def set_params(self, arg, aux):
        self.module.set_params(arg, aux)

    def optimizer_states(self):
        return self.module._updater.get_states(dump_optimizer=False)

    def load_optimizer_states(self, blob):
        self.module._updater.set_states(blob)
