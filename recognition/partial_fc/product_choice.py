"""Which kernel (``products.KERNELS``) runs each of the CPU head's three matrix products, picked by timing them
once at the step's real shapes and operands, or forced.

The fastest kernel depends on the CPU: numpy's OpenBLAS may be the fastest for one product on one machine and
fall back to a generic core, several times slower, on another (``utils/blas_check.py``); oneDNN and MXNet's own
OpenBLAS differ per product too. So the head's first step times every candidate on its own embeddings (B x D) and
the first rows of its k sampled centres (``TIMED_FLOATS``: the products are linear in k), within about a second,
and keeps the fastest of each product; the choice is logged once. The slice is larger than the last-level cache,
and the centre gradient's column blocks are read from a buffer of the real width k (its row stride): kernels
ranked on cache-resident operands ranked differently from the real step. Every candidate is exact to float32
rounding, but they round differently, so runs with different choices differ in the last bits.

The environment variable ``PFC_CPU_PRODUCTS`` forces kernels (tests, benchmarks, bit-reproducible runs):

    auto                                   time the candidates (the default)
    onednn | dot | numpy                   every product with this kernel
    logits=K,embedding=K,centre=K          per product (K a kernel or auto; a product left out is auto)

numpy's BLAS is a candidate only where its OpenBLAS runs a core made for this CPU (``numpy_blas_problem``);
forcing it elsewhere is an error. The oneDNN embedding gradient is the backward of the oneDNN logits, so it
goes with them only. Below ``MIN_TIMED_FLOATS`` (k x D) the products take a millisecond or so, timing them
would measure noise, and oneDNN runs them (the tests' tiny heads stay bit-identical to the oneDNN runs).
"""
import logging
import os
import time

import numpy as np

from recognition.partial_fc import products
from recognition.partial_fc.products import KERNELS
from utils.blas_check import cpu_model, cpu_vector_level, generic_blas_libraries

ENV = "PFC_CPU_PRODUCTS"
PRODUCTS = ("logits", "embedding", "centre")
DEFAULT = "onednn"
MIN_TIMED_FLOATS = 1 << 20      # k x D below 4 MB: oneDNN, untimed
# the k x D slice timed: 32 MB, 16,384 rows at D 512, as large as the last-level cache of the CPUs here (with
# the other operands, more), so the products read much of it from memory as the step's do
TIMED_FLOATS = 1 << 23
MARGIN = 0.15                   # how much faster than oneDNN another kernel must be timed to replace it
BUDGET_S = 1.0                  # timed rounds stop when the next one would end past this
MAX_ROUNDS = 3                  # timed rounds after the warm-up round (each candidate's best one counts)


def parse_setting(text):
    """{product: kernel or 'auto'} from a ``PFC_CPU_PRODUCTS`` value (see the module docstring)."""
    text = (text or "auto").strip().lower()
    choices = KERNELS + ("auto",)
    if "=" not in text:
        if text not in choices:
            raise ValueError("%s must be one of %s, or product=kernel pairs, got %r"
                             % (ENV, ", ".join(choices), text))
        return {product: text for product in PRODUCTS}
    setting = dict.fromkeys(PRODUCTS, "auto")
    for item in text.split(","):
        product, _, kernel = (part.strip() for part in item.partition("="))
        if product not in PRODUCTS or kernel not in choices:
            raise ValueError("%s: %r is not product=kernel with product one of %s and kernel one of %s"
                             % (ENV, item, ", ".join(PRODUCTS), ", ".join(choices)))
        setting[product] = kernel
    if setting["embedding"] == "onednn" and setting["logits"] not in ("onednn", "auto"):
        raise ValueError("%s: the oneDNN embedding gradient is the backward of the oneDNN logits, got logits=%s"
                         % (ENV, setting["logits"]))
    return setting


def numpy_blas_problem(pools=None, level=None):
    """Why numpy's BLAS may not be used here (a sentence), or None when its library runs a core made for this
    CPU. ``pools`` / ``level``: ``threadpoolctl.threadpool_info()`` and ``blas_check.cpu_vector_level()``
    (read from this process when not given)."""
    if pools is None:
        try:
            import threadpoolctl
        except ImportError:
            return "threadpoolctl is not installed, so numpy's BLAS core is unknown"
        pools, level = threadpoolctl.threadpool_info(), cpu_vector_level()
    mine = [pool for pool in pools if pool.get("user_api") == "blas" and "numpy" in (pool.get("filepath") or "")]
    if not mine:
        return "numpy's BLAS library was not found in this process"
    slow = generic_blas_libraries(mine, level)
    if slow:
        return ("numpy's OpenBLAS (%s) runs the generic core %r on this %s CPU"
                % (slow[0].get("filepath"), slow[0].get("architecture"), (level or "?").upper()))
    return None


def allowed_kernels(setting, numpy_problem):
    """{product: candidate kernels} of a parsed setting; raises when it forces numpy and numpy_problem is set."""
    allowed = {}
    for product in PRODUCTS:
        kernel = setting[product]
        if kernel == "numpy" and numpy_problem:
            raise ValueError("%s asks for numpy's BLAS for the %s product, but %s: use onednn, dot or auto"
                             % (ENV, product, numpy_problem))
        if kernel != "auto":
            allowed[product] = (kernel,)
        else:
            allowed[product] = tuple(k for k in KERNELS if not (k == "numpy" and numpy_problem))
    if setting["logits"] not in ("onednn", "auto"):      # the oneDNN embedding gradient needs the oneDNN logits
        allowed["embedding"] = tuple(k for k in allowed["embedding"] if k != "onednn")
    return allowed


def pick(allowed, seconds=None):
    """{product: kernel}: the fastest allowed kernel of each product by ``seconds`` ({product: {kernel: s}}),
    the logits and embedding kernels as a pair (the oneDNN embedding gradient only with the oneDNN logits);
    another kernel replaces oneDNN only when it is ``MARGIN`` faster (closer timings on a slice at start-up were
    seen to rank the kernels the other way round at the real size); without times, the first allowed kernel in
    ``KERNELS`` order (oneDNN first)."""
    def cost(product, kernel):
        return 0.0 if seconds is None else seconds[product].get(kernel, 0.0)
    pairs = [(l, e) for l in allowed["logits"] for e in allowed["embedding"] if not (e == "onednn" and l != "onednn")]
    if not pairs:
        raise ValueError("no kernel pair for the logits %s and the embedding gradient %s"
                         % (allowed["logits"], allowed["embedding"]))
    order = {k: i for i, k in enumerate(KERNELS)}
    pair_cost = lambda p: cost("logits", p[0]) + cost("embedding", p[1])
    logits, embedding = min(pairs, key=lambda p: (pair_cost(p), order[p[0]], order[p[1]]))
    if (DEFAULT, DEFAULT) in pairs and pair_cost((logits, embedding)) > (1 - MARGIN) * pair_cost((DEFAULT, DEFAULT)):
        logits, embedding = DEFAULT, DEFAULT
    centre = min(allowed["centre"], key=lambda k: (cost("centre", k), order[k]))
    if DEFAULT in allowed["centre"] and cost("centre", centre) > (1 - MARGIN) * cost("centre", DEFAULT):
        centre = DEFAULT
    return {"logits": logits, "embedding": embedding, "centre": centre}


def centre_blocks(width, rows, block_rows):
    """[(lo, hi)]: blocks of ``block_rows`` columns, ``rows`` columns in all, spread evenly over ``width``."""
    count = max(1, -(-rows // block_rows))
    step = max(block_rows, width // count)
    return [(lo, min(lo + block_rows, width)) for lo in range(0, min(width, count * step), step)][:count]


def time_candidates(x, unit, kernels, block_rows, grad=None, budget_s=BUDGET_S, rounds=MAX_ROUNDS):
    """{product: {kernel: best seconds}} of each kernel in ``kernels`` on the (B x D) ``x`` and the (rows x D)
    ``unit``, the centre gradient in blocks of ``block_rows`` as the update runs it, on column blocks spread over
    ``grad`` (B x k, the step's logits buffer; its values do not matter) when given. A warm-up round at the same
    shapes first (oneDNN builds its primitives for them, libraries start, buffers get their pages), then up to
    ``rounds`` timed rounds, interleaving the kernels, while the next one fits in ``budget_s`` (one always runs)."""
    start = time.perf_counter()
    (batch, dim), rows = x.shape, unit.shape[0]
    out = np.zeros((batch, rows), np.float32)
    grad = out if grad is None else grad
    blocks = centre_blocks(grad.shape[1], rows, block_rows)
    centre_out = np.zeros((min(block_rows, rows), dim), np.float32)
    scratch = np.zeros((min(block_rows, rows), batch), np.float32)

    def run(kernel, count, logits_out, centre_blocks_):
        t0 = time.perf_counter()
        product = products.LogitsProduct(x, unit[:count], logits_out, logits=kernel, embedding=kernel)
        t1 = time.perf_counter()
        product.data_grad()             # on the logits as they are: any values time the same
        t2 = time.perf_counter()
        centre = products.CentreProduct(x, kernel)
        for lo, hi in centre_blocks_:
            centre.block(grad, lo, hi, scratch, centre_out[:hi - lo])
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for kernel in kernels:
        run(kernel, rows, out, blocks)
    best = {product: {k: float("inf") for k in kernels} for product in PRODUCTS}
    for _ in range(rounds):
        round_start = time.perf_counter()
        for kernel in kernels:
            for name, seconds in zip(PRODUCTS, run(kernel, rows, out, blocks)):
                best[name][kernel] = min(best[name][kernel], seconds)
        now = time.perf_counter()
        if now - start + (now - round_start) > budget_s:
            break
    return best


class ProductChoice:
    """The kernel of each product (``kernels``: {product: kernel}), how it was reached (``how``: 'forced',
    'untimed' or 'timed'), the timings in ms at ``timed_rows`` rows when timed, and the seconds it took."""

    def __init__(self, kernels, how, ms=None, timed_rows=0, seconds=0.0):
        self.kernels, self.how, self.ms, self.timed_rows, self.seconds = dict(kernels), how, ms, timed_rows, seconds

    def __getitem__(self, product):
        return self.kernels[product]

    def describe(self, batch, k, dim):
        """One line for the log."""
        head = "Partial FC products on %s (B %d, D %d, k %d): " % (cpu_model(), batch, dim, k)
        if self.how != "timed":
            return head + ", ".join("%s %s" % kv for kv in self.kernels.items()) + " (%s)" % (
                "forced by %s" % ENV if self.how == "forced" else "too small to time")
        parts = []
        for product in PRODUCTS:
            times = ", ".join("%s %.1f" % (kernel, ms) for kernel, ms in self.ms[product].items())
            parts.append("%s %s [%s ms]" % (product, self.kernels[product], times))
        return head + "; ".join(parts) + " (timed at %d rows in %.2f s)" % (self.timed_rows, self.seconds)


def resolve(setting=None, pools=None, level=None):
    """{product: candidate kernels} of a ``PFC_CPU_PRODUCTS`` value (None: the environment's, else auto), numpy
    left out where its BLAS runs a generic core (``pools`` / ``level``: see ``numpy_blas_problem``). Raises
    ValueError for a bad value, or one that forces numpy's BLAS where it runs a generic core."""
    parsed = parse_setting(os.environ.get(ENV, "auto") if setting is None else setting)
    wants_numpy = any(kernel in ("numpy", "auto") for kernel in parsed.values())
    return allowed_kernels(parsed, numpy_blas_problem(pools, level) if wants_numpy else None)


def choose(x, unit, block_rows, allowed, grad=None, log=None):
    """The ``ProductChoice`` among ``allowed`` (``resolve``) for a head's step on the (B x D) embeddings ``x``
    and its (k x D) sampled unit centres ``unit`` (read only), with centre-gradient blocks of ``block_rows`` rows
    read from ``grad`` (the step's (B x k) logits buffer, overwritten; None: a narrow buffer); logs it once."""
    start = time.perf_counter()
    (batch, dim), k = x.shape, unit.shape[0]
    if all(len(kernels) == 1 for kernels in allowed.values()):
        choice = ProductChoice(pick(allowed), "forced")
    elif k * dim < MIN_TIMED_FLOATS:
        choice = ProductChoice(pick(allowed), "untimed")
    else:
        rows = min(k, max(block_rows, TIMED_FLOATS // dim))
        kernels = tuple(kernel for kernel in KERNELS if any(kernel in allowed[p] for p in PRODUCTS))
        seconds = time_candidates(x, unit[:rows], kernels, min(block_rows, rows), grad)
        ms = {p: {kernel: 1000.0 * seconds[p][kernel] for kernel in allowed[p]} for p in PRODUCTS}
        choice = ProductChoice(pick(allowed, seconds), "timed", ms, rows, time.perf_counter() - start)
    (log or logging.getLogger("recognition.train")).info(choice.describe(batch, k, dim))
    return choice
