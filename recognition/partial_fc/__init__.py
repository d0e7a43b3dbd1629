"""Partial FC (An et al., arXiv 2010.05222 / 2203.15565): the class-centre matrix sharded over Horovod ranks,
PPRN sampling, one exact margin softmax across ranks.

    method.py           Partial FC as a training method (its config keys and flags, its step, checkpoints)
    head.py             the operator as the method's head, with world-size-independent checkpoints
    operator.py         the algorithm: gather, sample, pull, margin softmax, backward, update (``PartialFC``)
    kernels.py          the contract of its kernel sets and the cross-rank softmax they share
    kernels_cpu.py      NumPy kernel set: each product in its fastest kernel here (``products.py``), blocked updates
    kernels_ndarray.py  NDArray kernel set: everything on the operator's context (the GPU path)
    sampler.py          positive + random negative sampling (PPRN), vectorised
    memory_bank.py      centre + momentum storage on the device or in host memory (``make_bank``)
    disk_bank.py        the out-of-core tier (a sparse file on local disk)
    cpu_kernels.py      fused numba row kernels of the banks and their deterministic initial rows
    products.py         the CPU head's matrix products, each in three kernels (oneDNN, nd.dot, numpy's BLAS)
    product_choice.py   which kernel runs each product: timed at the first step's shapes, or PFC_CPU_PRODUCTS
    bank_queue.py       the ordered bank thread that overlaps pulls and pushes with the backbone
"""
