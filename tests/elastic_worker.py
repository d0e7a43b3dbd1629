"""recognition/train.py as tests/test_elastic.py runs it under horovodrun's elastic driver: the tiny test backbone,
plus the test's two timing controls, set through the environment, and a report of what the process left running.

    ELASTIC_TEST_KILL=R,S    rank R of the first world of 3 SIGKILLs itself when it is about to train step S + 1
    ELASTIC_TEST_GROW_AT=G   rank 0 of a world of 2 holds its commit at step G until the driver has told it of an
                             added host, so the job grows at exactly that commit (the test adds the host earlier)
    ELASTIC_TEST_REPORT=DIR  each process writes DIR/<pid>.json at its end: exit code and live threads
"""
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import patch_backbone  # noqa: E402

HOLD_LIMIT = 300.0          # seconds rank 0 waits for the host notification before it gives up (the test then fails)


def _kill_at(rank, step):
    from recognition import dist
    from recognition.trainer import Trainer
    real = Trainer.train_step

    def train_step(self, batch, *args, **kwargs):
        if dist.size() == 3 and dist.rank() == rank and self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch, *args, **kwargs)
    Trainer.train_step = train_step


def _hold_growth_at(step):
    from recognition import dist
    from recognition.elastic import ElasticState
    real = ElasticState.check_host_updates

    def check_host_updates(self):
        if dist.size() == 2 and dist.rank() == 0 and self.pending.step == step:
            deadline = time.monotonic() + HOLD_LIMIT
            while self._host_messages.empty() and time.monotonic() < deadline:
                time.sleep(0.1)
        return real(self)
    ElasticState.check_host_updates = check_host_updates


def main():
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    patch_backbone()
    kill = os.environ.get("ELASTIC_TEST_KILL")
    if kill:
        _kill_at(*(int(v) for v in kill.split(",")))
    if os.environ.get("ELASTIC_TEST_GROW_AT"):
        _hold_growth_at(int(os.environ["ELASTIC_TEST_GROW_AT"]))
    from recognition.train import main as train_main
    code = train_main(sys.argv[1:])
    report = os.environ.get("ELASTIC_TEST_REPORT")
    if report:
        threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
        with open(os.path.join(report, "%d.json" % os.getpid()), "w") as f:
            json.dump({"code": code, "threads": threads, "host": os.environ.get("HOROVOD_HOSTNAME")}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
