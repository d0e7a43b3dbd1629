"""Feasibility probe: can an MXNet + Horovod (Gloo) process recover in place when a rank dies, and grow?

Horovod 0.28.1 has elastic modules for PyTorch and TensorFlow only. This probe drives ``horovod.mxnet`` with
the framework-independent parts (``horovod.common.elastic.ObjectState`` and ``run_fn``) and records, as JSON
lines, what each process sees: the exception of the failed collective and where it surfaces, the time
``mx.nd.waitall()``, ``hvd.shutdown()`` and ``hvd.init()`` take, whether a fresh MXNet op runs, and the exact
check of every collective on every world. See docs/elastic.md.

Worker (what horovodrun starts on every slot; a discovery script S lists ``host:slots`` lines):

    horovodrun --gloo -np 3 --min-np 2 --max-np 3 --host-discovery-script S --network-interface lo \\
        python tools/elastic_probe.py --log-dir DIR --steps 40 --kill-rank 0 --kill-step 10

Scenario (sets up hosts, discovery script and log folder, runs horovodrun as above, kills / adds a host,
checks the logs, prints a verdict and one JSON line; exit code 0 when every check holds):

    python tools/elastic_probe.py --scenario shrink|grow|both [--kill-rank R] [--kill external] [--gloo-timeout S]

Every "host" is a different name of this machine (localhost, 127.0.0.1, 127.1, ...), one slot each: Horovod
blacklists a whole host when one of its workers fails, so one host with N slots cannot lose only one rank.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time

LAUNCHED = time.time()   # before numpy / mxnet are imported: a new worker's start-up counts against the gloo timeout

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = 1000            # elements of each probe allreduce


class EventLog:
    """Append-only JSON-lines log of one worker process (one file per process, flushed at every event)."""

    def __init__(self, folder):
        self.host = os.environ.get("HOROVOD_HOSTNAME", "?")
        self.path = os.path.join(folder, "events-%s-%d.jsonl" % (self.host, os.getpid()))
        self.world = 0  # how many times hvd.init() succeeded in this process

    def __call__(self, ev, **fields):
        rec = dict(ev=ev, host=self.host, pid=os.getpid(), world=self.world, t=round(time.time(), 3), **fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("[probe %s pid %d] %s" % (self.host, os.getpid(), json.dumps(rec)), flush=True)


class Watchdog:
    """Fails loudly instead of hanging: if the block runs past ``seconds``, log a 'hang' event and exit 3."""

    def __init__(self, log, what, seconds):
        self.log, self.what, self.seconds = log, what, seconds

    def _fire(self):
        import faulthandler
        self.log("hang", what=self.what, seconds=self.seconds)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)

    def __enter__(self):
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.elapsed = time.perf_counter() - self.began


def make_state_class():
    from horovod.common.elastic import ObjectState
    from horovod.common.exceptions import HostsUpdatedInterrupt

    class ProbeState(ObjectState):
        """ObjectState that logs the host-update interrupt (how a running worker learns of a new host)."""

        def __init__(self, log, **kwargs):
            import horovod.mxnet as hvd
            self._log = log
            super().__init__(bcast_object=guarded(hvd.broadcast_object, log, "broadcast_object"), get_rank=hvd.rank,
                             **kwargs)

        def check_host_updates(self):
            try:
                super().check_host_updates()
            except HostsUpdatedInterrupt as e:
                self._log("hosts_updated", step=self.step, skip_sync=e.skip_sync)
                raise

    return ProbeState


def guarded(fn, log, where):
    """``fn`` with an MXNetError turned into HorovodInternalError, the only failure ``run_fn`` recovers from.

    State.sync() and State.commit() call ``bcast_object`` outside any read of ours: without this, a rank lost
    during a commit kills the survivors with an MXNetError.
    """
    import functools
    import mxnet as mx
    from horovod.common.exceptions import HorovodInternalError

    @functools.wraps(fn)
    def call(*args, **kwargs):
        began = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            # horovod.mxnet's broadcast_object returns on the root before its broadcasts ran (MXNet ops are
            # asynchronous): a root that then leaves or shuts down fails the others' pending broadcast.
            mx.nd.waitall()
            return out
        except mx.base.MXNetError as e:
            log("collective_failed", where=where, type="%s.%s" % (type(e).__module__, type(e).__name__),
                after_s=round(time.perf_counter() - began, 3), message=str(e)[:600])
            raise HorovodInternalError(str(e)) from e
    return call


def make_updater():
    """A fresh SGD (lr 1) in Horovod's DistributedOptimizer, which bakes 1/size into rescale_grad when built."""
    import mxnet as mx
    import horovod.mxnet as hvd
    return mx.optimizer.get_updater(hvd.DistributedOptimizer(mx.optimizer.SGD(learning_rate=1.0, momentum=0.0)))


def worker(args):
    args.launched = LAUNCHED
    import mxnet as mx
    import horovod.mxnet as hvd
    from horovod.common.elastic import run_fn
    from horovod.common.exceptions import HorovodInternalError

    log = EventLog(args.log_dir)
    log("imported", import_s=round(time.time() - args.launched, 3))
    with Watchdog(log, "first hvd.init", args.watchdog) as w:
        hvd.init()
    log.world = 1
    log("start", rank=hvd.rank(), size=hvd.size(), init_s=round(w.elapsed, 3))
    opt = {"updater": make_updater()}
    net = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=1, no_bias=True, name="fc")
    exe = mx.sym.MakeLoss(mx.sym.sum(net)).simple_bind(mx.cpu(), data=(1, 8), grad_req={"data": "null",
                                                                                         "fc_weight": "write"})
    state = make_state_class()(log, step=0, weight=np.zeros(8, np.float32), history=[])

    def failed(e, where, began, pending):
        """Log the failure, drain every output pushed so far (none may block), return HorovodInternalError."""
        log("collective_failed", where=where, type="%s.%s" % (type(e).__module__, type(e).__name__),
            after_s=round(time.perf_counter() - began, 3), message=str(e)[:600], step=state.step)
        drained = []
        for name, nd in pending:
            reads = []
            for _ in range(2):  # MXNet rethrows an op's error once, then the same array reads "fine"
                try:
                    with Watchdog(log, "drain " + name, args.watchdog):
                        reads.append("ok, first value %r" % float(nd.asnumpy().ravel()[0]))
                except mx.base.MXNetError as e2:
                    reads.append("raised " + str(e2).splitlines()[0][:60])
            drained.append([name] + reads)
        log("drained", outputs=drained)
        return HorovodInternalError(str(e))

    def step_once():
        r, size = hvd.rank(), hvd.size()
        if args.kill_rank == r and state.step == args.kill_step and log.world == 1 and args.kill == "self":
            log("killing_self", rank=r, step=state.step)   # the others are then blocked in this step's collectives
            os.kill(os.getpid(), signal.SIGKILL)
        began, pending, where = time.perf_counter(), [], "pushing the collectives"
        try:
            for i in range(args.queue):
                pending.append(("allreduce %d" % i, hvd.allreduce(mx.nd.full((SHAPE,), (r + 1) * (i + 1)),
                                                                  op=hvd.Sum, name="probe.sum.%d" % i)))
            pending.append(("dependent op", pending[0][1] * 2 + 1))   # a plain MXNet op reading a collective
            # A symbolic executor bound in the first world, as the trainer's backbone is: loss = sum(w . x) with
            # x = rank + 1, so its weight gradient is rank + 1; the DistributedOptimizer allreduces it in place.
            exe.arg_dict["data"][:] = r + 1
            exe.arg_dict["fc_weight"][:] = state.weight.reshape(1, -1)
            exe.forward(is_train=True)
            exe.backward()
            weight = exe.arg_dict["fc_weight"]
            opt["updater"](0, exe.grad_dict["fc_weight"], weight)
            pending.append(("optimizer weight", weight))
            values = {}
            for phase in ("gather", "read") if args.allgather_first else ("read", "gather", "read"):
                if phase == "gather":
                    # hvd.allgather blocks inside the call (it waits for its output to learn the shape).
                    where = "inside the hvd.allgather call"
                    pending.append(("allgather", hvd.allgather(mx.nd.full((r + 1, 3), r), name="probe.gather")))
                    continue
                for what, nd in pending:
                    if what not in values:
                        where = "asnumpy of " + what
                        with Watchdog(log, where, args.watchdog):
                            values[what] = nd.asnumpy()
        except mx.base.MXNetError as e:
            raise failed(e, where, began, pending) from e
        tri = size * (size + 1) // 2
        expect = {"dependent op": 2 * tri + 1, "optimizer weight": state.weight[0] - (size + 1) / 2.0}
        expect.update({"allreduce %d" % i: (i + 1) * tri for i in range(args.queue)})
        for what, value in expect.items():
            if not np.all(values[what] == np.float32(value)):
                raise AssertionError("step %d, world of %d: %s gave %s, expected exactly %s"
                                     % (state.step, size, what, np.unique(values[what])[:5], value))
        rows = np.concatenate([np.full((q + 1, 3), q, np.float32) for q in range(size)])
        if not np.array_equal(values["allgather"], rows):
            raise AssertionError("step %d: allgather gave %s" % (state.step, values["allgather"][:, 0]))
        state.weight = values["optimizer weight"].ravel()
        state.history = state.history + [size]
        state.step += 1
        log("step_ok", rank=r, size=size, step=state.step, seconds=round(time.perf_counter() - began, 3))

    def train(state):
        log("synced", rank=hvd.rank(), size=hvd.size(), step=state.step)
        # At least --steps, and the last 3 of them on --final-size ranks (growth arrives when it arrives).
        while state.step < args.steps or args.final_size and state.history[-3:] != [args.final_size] * 3:
            step_once()
            time.sleep(args.step_sleep)
            if state.step % args.commit_every == 0:
                state.commit()
        # Nobody leaves (and shuts Horovod down under the others' pending ops) before all have finished.
        guarded(lambda: hvd.allreduce(mx.nd.zeros((1,)), name="probe.final").asnumpy(), log, "final barrier")()

    def reset():
        with Watchdog(log, "mx.nd.waitall after failure", args.watchdog) as w:
            try:
                mx.nd.waitall()
                waitall = "returned"
            except mx.base.MXNetError as e:
                waitall = "raised: " + str(e).splitlines()[0][:200]
        waitall_s = w.elapsed
        with Watchdog(log, "hvd.shutdown", args.watchdog) as w:
            hvd.shutdown()
        shutdown_s = w.elapsed
        with Watchdog(log, "hvd.init again", args.watchdog) as w:
            hvd.init()
        log.world += 1
        fresh = (mx.nd.ones((4,)) * 3).asnumpy().tolist()
        log("reinit", rank=hvd.rank(), size=hvd.size(), waitall=waitall, waitall_s=round(waitall_s, 3),
            shutdown_s=round(shutdown_s, 3), init_s=round(w.elapsed, 3), fresh_op=fresh, step=state.step)
        if not args.keep_optimizer:
            opt["updater"] = make_updater()

    run_fn(train, reset)(state)
    log("done", rank=hvd.rank(), size=hvd.size(), step=state.step, weight0=float(state.weight[0]),
        history=state.history)
    hvd.shutdown()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=["shrink", "grow", "both"], help="run a whole scenario (default: be a worker)")
    p.add_argument("--log-dir", help="worker: folder for the JSON-lines event logs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--commit-every", type=int, default=2, help="state.commit() every N steps")
    p.add_argument("--queue", type=int, default=4, help="allreduces pushed per step before anything is read")
    p.add_argument("--step-sleep", type=float, default=0.1, help="seconds between steps (time for discovery)")
    p.add_argument("--kill", choices=["self", "external"], default="self",
                   help="self: the rank SIGKILLs itself at the start of step --kill-step; external: the scenario "
                        "SIGKILLs it wherever it is once a rank has passed that step")
    p.add_argument("--kill-rank", type=int, default=0, help="rank of the first world that dies (-1: none)")
    p.add_argument("--kill-step", type=int, default=10)
    p.add_argument("--final-size", type=int, default=0,
                   help="worker: go on past --steps until the last 3 steps ran on this many ranks (0: stop at --steps)")
    p.add_argument("--allgather-first", action="store_true",
                   help="call hvd.allgather before reading the allreduce outputs (default: after)")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="do not rebuild the DistributedOptimizer after a reset (shows why it must be rebuilt)")
    p.add_argument("--watchdog", type=float, default=60.0, help="worker: seconds before a blocked call counts as hung")
    p.add_argument("--gloo-timeout", type=int, default=0,
                   help="scenario: horovodrun --gloo-timeout-seconds (0: Horovod's default, 30 s)")
    p.add_argument("--timeout", type=float, default=240.0, help="scenario: seconds before the job counts as hung")
    p.add_argument("--work", help="scenario: folder for the hosts file, discovery script and logs (default: a new "
                                  "temporary folder, kept)")
    args = p.parse_args(argv)
    if not args.scenario and not args.log_dir:
        p.error("a worker needs --log-dir")
    return args


def main():
    args = parse_args()
    if not args.scenario:
        return worker(args)
    from tools.elastic_probe_scenario import run_scenario
    checks, summary = run_scenario(args)
    for name, (ok, evidence) in checks.items():
        print("%s  %s\n      %s" % ("PASS" if ok else "FAIL", name, evidence))
    print(json.dumps(summary))
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
