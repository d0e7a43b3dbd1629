"""Start-up check that numpy's (and MXNet's) OpenBLAS run kernels made for this CPU.

The OpenBLAS bundled with a numpy or MXNet wheel picks its kernels (its "core") from the CPU when it loads. A
build older than the CPU does not recognise it and falls back to a generic core such as "Prescott" (SSE3),
several times slower on an AVX2 or AVX-512 machine, and from one run to the next the same command can then
differ by 3x. The Partial FC step uses numpy's BLAS only where it runs a core made for this CPU
(``recognition/partial_fc/product_choice.py``); tools and evaluation use it regardless.
``warn_if_generic_blas`` logs one warning that names the fix, ``OPENBLAS_CORETYPE``; it never sets it (the
variable only works before the library loads, and the choice is the user's).
"""
import functools
import logging

# OpenBLAS cores with AVX2 kernels or better (lower case, as openblas_get_corename spells them, case aside)
AVX2_CORES = frozenset({"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"})


def cpu_vector_level(features=None):
    """'avx512', 'avx2' or None, from numpy's runtime CPU detection (or a given {feature: bool} dict)."""
    if features is None:
        from numpy.core._multiarray_umath import __cpu_features__ as features
    if features.get("AVX512F"):
        return "avx512"
    if features.get("AVX2"):
        return "avx2"
    return None


def generic_blas_libraries(pools, level):
    """The OpenBLAS entries of ``threadpoolctl.threadpool_info()`` output that run a pre-AVX2 core on a CPU of
    vector ``level`` ('avx2' / 'avx512'); only numpy's and MXNet's copies count (the ones this project calls)."""
    if level is None:
        return []
    slow = []
    for pool in pools:
        path = pool.get("filepath") or ""
        if pool.get("internal_api") != "openblas" or not any(key in path for key in ("numpy", "mxnet")):
            continue
        core = (pool.get("architecture") or "unknown").lower()
        if core not in AVX2_CORES:
            slow.append(pool)
    return slow


def generic_blas_message(pools, level):
    """The warning for ``generic_blas_libraries(pools, level)``, or None when every copy runs a fitting core."""
    slow = generic_blas_libraries(pools, level)
    if not slow:
        return None
    fix = "SkylakeX" if level == "avx512" else "Haswell"
    names = ", ".join("%s (OpenBLAS %s, core %r)" % (pool["filepath"], pool.get("version") or "?",
                                                       pool.get("architecture")) for pool in slow)
    return ("OpenBLAS runs generic kernels on this %s CPU: %s. Its matrix products (numpy's @, tools, evaluation) "
            "can be several times slower than the CPU allows. Fix: export OPENBLAS_CORETYPE=%s (or another core "
            "this CPU supports) before starting Python; this program does not set it."
            % (level.upper(), names, fix))


def blas_cores():
    """{'numpy': core, 'mxnet': core} of the OpenBLAS copies loaded in this process (for benchmark headers)."""
    import threadpoolctl
    cores = {}
    for pool in threadpoolctl.threadpool_info():
        path = pool.get("filepath") or ""
        for owner in ("numpy", "mxnet"):
            if pool.get("internal_api") == "openblas" and owner in path:
                cores[owner] = "%s (OpenBLAS %s)" % (pool.get("architecture"), pool.get("version") or "?")
    return cores


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=None)
def _message_once():
    try:
        import threadpoolctl
    except ImportError:     # nothing to inspect with
        return None
    import numpy  # noqa: F401 - load numpy's OpenBLAS so threadpoolctl sees it
    return generic_blas_message(threadpoolctl.threadpool_info(), cpu_vector_level())


def warn_if_generic_blas(log=None):
    """Log one warning per process (``log`` or the 'recognition' logger) when numpy's or MXNet's OpenBLAS uses a
    generic core on an AVX2 / AVX-512 CPU; returns the message (None when all is well). Call it at start-up,
    after importing mxnet."""
    first = _message_once.cache_info().currsize == 0
    message = _message_once()
    if message and first:
        (log or logging.getLogger("recognition")).warning(message)
    return message
