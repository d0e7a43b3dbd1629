"""One ordered worker for the memory bank's jobs (pulls and pushes), so bank I/O runs beside the backbone.

Jobs run one at a time in the order they were submitted. That order is the whole correctness argument of the
pipelined Partial FC step: the push of step t is submitted before the pull of step t+1, so a row both steps
sample is read only after its update is written, and the parameters are bit-identical to the sequential run.

After a job fails, every later job fails with the same error without running (the bank may be half updated);
``wait`` and ``drain`` re-raise it on the caller's thread.
"""
from concurrent.futures import Future, ThreadPoolExecutor


class BankJobError(RuntimeError):
    """An earlier bank job failed; this one did not run."""


class BankQueue:
    """``threaded=False`` runs each job at once on the caller's thread (the sequential mode), same interface."""

    def __init__(self, threaded=True):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfc-bank") if threaded else None
        self._last = None
        self._failure = None      # (exception, job name) of the first failed job

    @property
    def threaded(self):
        return self._executor is not None

    def submit(self, name, fn, *args):
        """Queue ``fn(*args)``; returns a Future. Without a thread the job has already run (errors raise here)."""
        if self._executor is None:
            done = Future()
            done.set_result(fn(*args))
            return done
        self._last = self._executor.submit(self._run, name, fn, args)
        return self._last

    def _run(self, name, fn, args):
        if self._failure is not None:
            err, failed = self._failure
            raise BankJobError("memory bank job %r skipped: %r failed before it (%s: %s)"
                               % (name, failed, type(err).__name__, err)) from err
        try:
            return fn(*args)
        except BaseException as err:
            self._failure = (err, name)
            raise

    @staticmethod
    def wait(future):
        """The job's result; its exception if it failed."""
        return future.result()

    def drain(self):
        """Wait until every submitted job has run; raise the first failure, if any."""
        if self._last is not None:
            self._last.exception()
        if self._failure is not None:
            err, name = self._failure
            raise BankJobError("memory bank job %r failed (%s: %s)" % (name, type(err).__name__, err)) from err

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
