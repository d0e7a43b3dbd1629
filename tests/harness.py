"""Runs a test body on N Horovod ranks (``horovodrun -np N -H localhost:N --gloo``) and collects results.

A body is a module-level function ``body(**kwargs)`` in an importable module (a test module is fine). Each
rank imports it, calls ``hvd.init()``, runs it and pickles its return value; :func:`run_ranks` returns the
values ordered by rank. Any rank that fails, or the job running past ``timeout``, fails the calling test
with every rank's output: the whole process group is killed, so nothing is left hanging.
"""
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RankFailure(AssertionError):
    """A multi-rank job failed or timed out; the message holds the ranks' output."""


def horovodrun_path():
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return exe if os.path.exists(exe) else "horovodrun"


def run_ranks(body, np=2, timeout=120, kwargs=None, env=None, threads_per_rank=1):
    """Run ``body(**kwargs)`` on ``np`` ranks; return the list of per-rank return values.

    Raises :class:`RankFailure` (with all output) if any rank raises or exits non-zero, or if the job
    does not finish within ``timeout`` seconds (then every process of the job is killed first).
    """
    module, name = body.__module__, body.__qualname__
    if module == "__main__" or "." in name:
        raise ValueError("run_ranks needs a module-level function of an importable module, got %s.%s"
                         % (module, name))
    with tempfile.TemporaryDirectory(prefix="ranks-") as work:
        with open(os.path.join(work, "kwargs.pkl"), "wb") as f:
            pickle.dump(kwargs or {}, f)
        cmd = [horovodrun_path(), "-np", str(np), "-H", "localhost:%d" % np, "--gloo",
               sys.executable, "-m", "tests.rank_main", module, name, work]
        proc_env = dict(os.environ)
        proc_env.update({"OMP_NUM_THREADS": str(threads_per_rank), "MXNET_CPU_WORKER_NTHREADS": "1",
                         "PYTHONPATH": ROOT + os.pathsep + proc_env.get("PYTHONPATH", ""),
                         "PYTHONUNBUFFERED": "1"})
        proc_env.update(env or {})
        log_path = os.path.join(work, "output.log")
        start = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=proc_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.returncode
            finally:
                _kill_group(proc)  # stray ranks that outlived horovodrun
        with open(log_path, "rb") as f:
            output = f.read().decode("utf-8", "replace")
        if timed_out:
            raise RankFailure("%d-rank job %s.%s timed out after %.0f s and was killed; output:\n%s"
                              % (np, module, name, time.time() - start, output))
        results = []
        for rank in range(np):
            path = os.path.join(work, "rank%d.pkl" % rank)
            if not os.path.exists(path):
                raise RankFailure("%d-rank job %s.%s failed (exit code %s, rank %d returned nothing); "
                                  "output:\n%s" % (np, module, name, rc, rank, output))
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        if rc != 0:
            raise RankFailure("%d-rank job %s.%s exited with code %s; output:\n%s" % (np, module, name, rc, output))
        return results


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
