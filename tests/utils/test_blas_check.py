"""The OpenBLAS-core warning: when it fires, what it says, that it fires once, and that it never sets the fix."""
import os
import subprocess
import sys

from utils.blas_check import cpu_vector_level, generic_blas_message
from tests.harness import ROOT

NUMPY_LIB = "/venv/lib/python3.11/site-packages/numpy.libs/libopenblas64_p-r0-742d56dc.3.20.so"
MXNET_LIB = "/venv/lib/python3.11/site-packages/mxnet/libopenblas.so.0"
OTHER_LIB = "/venv/lib/python3.11/site-packages/opencv_python_headless.libs/libopenblas-r0-f650aae0.3.3.so"


def pools(numpy_core, mxnet_core="Haswell", other_core="Barcelona"):
    return [{"internal_api": "openblas", "filepath": NUMPY_LIB, "version": "0.3.20", "architecture": numpy_core},
            {"internal_api": "openmp", "filepath": "/usr/lib/libgomp.so.1"},
            {"internal_api": "openblas", "filepath": MXNET_LIB, "version": "0.3.13", "architecture": mxnet_core},
            {"internal_api": "openblas", "filepath": OTHER_LIB, "version": None, "architecture": other_core}]


def test_vector_level_from_cpu_features():
    assert cpu_vector_level({"AVX2": True, "AVX512F": True}) == "avx512"
    assert cpu_vector_level({"AVX2": True, "AVX512F": False}) == "avx2"
    assert cpu_vector_level({"AVX": True}) is None


def test_generic_core_on_a_modern_cpu_is_reported_with_the_fix():
    message = generic_blas_message(pools("Prescott"), "avx512")
    assert "numpy.libs/libopenblas64_p" in message and "'Prescott'" in message and "0.3.20" in message
    assert "OPENBLAS_CORETYPE=SkylakeX" in message
    assert "mxnet" not in message and "opencv" not in message    # Haswell is fine; other packages' copies ignored
    assert "OPENBLAS_CORETYPE=Haswell" in generic_blas_message(pools("Sandybridge"), "avx2")
    assert "mxnet/libopenblas.so.0" in generic_blas_message(pools("Zen", mxnet_core="Core2"), "avx2")


def test_fitting_cores_or_an_old_cpu_give_no_warning():
    for core in ("Haswell", "SkylakeX", "Zen", "COOPERLAKE", "SapphireRapids"):
        assert generic_blas_message(pools(core), "avx512") is None
    assert generic_blas_message(pools("Prescott", mxnet_core="Prescott"), None) is None


def test_one_warning_per_process_and_the_environment_is_left_alone():
    """A real process whose OpenBLAS copies are forced onto the generic core (this machine has AVX2)."""
    code = ("import os, logging, mxnet\n"
            "from utils.blas_check import warn_if_generic_blas\n"
            "logging.basicConfig(format='LOG %(levelname)s %(message)s')\n"
            "first, second = warn_if_generic_blas(), warn_if_generic_blas()\n"
            "print('SAME', first == second, 'ENV', os.environ['OPENBLAS_CORETYPE'])\n")
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    if cpu_vector_level() is None:       # a CPU without AVX2: nothing to warn about
        assert "LOG WARNING" not in out.stderr
        return
    assert out.stderr.count("LOG WARNING OpenBLAS runs generic kernels") == 1, out.stderr
    assert "'Prescott'" in out.stderr and "OPENBLAS_CORETYPE=" in out.stderr
    assert "SAME True ENV Prescott" in out.stdout
