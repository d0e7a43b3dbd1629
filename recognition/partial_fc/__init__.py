"""Partial FC (An et al., arXiv 2010.05222 / 2203.15565): the class-centre matrix sharded over Horovod ranks,
PPRN sampling, one exact margin softmax across ranks.

    operator.py     the operator: gather, sample, margin softmax, backward (``PartialFC``)
    head.py         the operator as the trainer's head, with world-size-independent checkpoints
    sampler.py      positive + random negative sampling (PPRN), vectorised
    margin.py       the combined margin s*(cos(m1*theta+m2)-m3) and its derivative
    memory_bank.py  centre + momentum storage on the device or in host memory
    disk_bank.py    the out-of-core tier (a sparse file on local disk)
    cpu_kernels.py  fused numba row kernels of the banks (and their deterministic initial rows)
    products.py     the CPU head's matrix products through MXNet's oneDNN FullyConnected
    bank_queue.py   the ordered bank thread that overlaps pulls and pushes with the backbone
"""
from recognition.partial_fc.operator import IGNORE_LABEL, PartialFC  # noqa: F401
from recognition.partial_fc.head import PartialFCHead  # noqa: F401
