"""The scenario driver of the elastic probe (tools/elastic_probe.py --scenario): it sets up the hosts, the
discovery script and the log folder, runs the probe's workers under horovodrun's elastic driver, kills a rank /
adds a host as the scenario says, and judges the workers' JSON-lines events (``judge``: each check with its
evidence). See docs/elastic.md.

Every "host" is a different name of this machine (``local_host_names``), one slot each.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

LOCAL_NAME_CANDIDATES = ["localhost", "127.0.0.1", "127.1", "127.0.1", "127.000.000.001", "0177.1"]
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elastic_probe.py")   # what horovodrun starts


def local_host_names(count):
    """``count`` different names that horovodrun launches locally (they resolve to an address of this machine)."""
    import psutil
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    names = []
    for name in LOCAL_NAME_CANDIDATES + [socket.gethostname()]:
        try:
            if socket.gethostbyname(name) in local and name not in names:
                names.append(name)
        except OSError:
            pass
    if len(names) < count:
        raise SystemExit("elastic_probe: needs %d local host names, found %s" % (count, names))
    return names[:count]


def read_events(folder):
    """Every event the workers (and the scenario) logged in ``folder``, in time order."""
    events = []
    for path in glob.glob(os.path.join(folder, "events-*.jsonl")):
        with open(path) as f:
            events += [json.loads(line) for line in f if line.strip()]
    return sorted(events, key=lambda e: e["t"])


def run_scenario(args):
    """Run one scenario under horovodrun; return (checks, summary)."""
    work = args.work or tempfile.mkdtemp(prefix="elastic-probe-")
    os.makedirs(work, exist_ok=True)
    names = local_host_names(4)
    initial = names[:2] if args.scenario == "grow" else names[:3]
    hosts_file = os.path.join(work, "hosts")
    write_hosts(hosts_file, initial)
    discover = os.path.join(work, "discover.sh")
    with open(discover, "w") as f:
        f.write("#!/bin/sh\ncat %s\n" % hosts_file)
    os.chmod(discover, 0o755)
    log_dir = os.path.join(work, "events")
    os.mkdir(log_dir)
    kill = args.scenario in ("shrink", "both")
    hvdrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [hvdrun if os.path.exists(hvdrun) else "horovodrun", "--gloo", "-np", str(len(initial)),
           "--min-np", "2", "--max-np", "3", "--host-discovery-script", discover, "--network-interface", "lo",
           sys.executable, WORKER, "--log-dir", log_dir, "--steps", str(args.steps),
           "--commit-every", str(args.commit_every), "--queue", str(args.queue), "--step-sleep", str(args.step_sleep),
           "--kill", args.kill, "--kill-rank", str(args.kill_rank if kill else -1), "--kill-step", str(args.kill_step),
           "--final-size", str(2 if args.scenario == "shrink" else 3)]
    cmd += ["--keep-optimizer"] if args.keep_optimizer else []
    cmd += ["--allgather-first"] if args.allgather_first else []
    if args.gloo_timeout:
        cmd[1:1] = ["--gloo-timeout-seconds", str(args.gloo_timeout)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1", PYTHONUNBUFFERED="1")
    print("elastic_probe: %s\n  hosts: %s\n  log: %s" % (" ".join(cmd), initial, work), flush=True)
    began = time.time()
    with open(os.path.join(work, "horovodrun.log"), "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed_host = grown = None
        while proc.poll() is None and time.time() - began < args.timeout:
            time.sleep(0.2)
            events = read_events(log_dir)
            first = [e for e in events if e["ev"] == "step_ok" and e["world"] == 1]
            if kill and killed_host is None and args.kill == "external" and any(
                    e["step"] > args.kill_step for e in first):
                victim = [e for e in events if e["ev"] == "start" and e["rank"] == args.kill_rank][0]
                os.kill(victim["pid"], signal.SIGKILL)
                killed_host = victim["host"]
                with open(os.path.join(log_dir, "events-scenario.jsonl"), "a") as f:
                    f.write(json.dumps(dict(ev="killed", host=killed_host, pid=victim["pid"], t=time.time())) + "\n")
                print("elastic_probe: SIGKILL to pid %d (%s)" % (victim["pid"], killed_host), flush=True)
            if kill and killed_host is None:
                dead = [e for e in events if e["ev"] == "killing_self"]
                if dead:
                    killed_host = dead[0]["host"]
            if killed_host and killed_host in initial and any(e["ev"] == "reinit" for e in events):
                initial = [h for h in initial if h != killed_host]   # the discovery script stops listing it
                write_hosts(hosts_file, initial)
            grow_after = args.kill_step + 8 if args.scenario == "both" else args.kill_step
            ready = [e for e in events if e["ev"] == "step_ok" and e["step"] >= grow_after and e["size"] == 2]
            if args.scenario in ("grow", "both") and grown is None and ready:
                grown = names[3]
                write_hosts(hosts_file, initial + [grown])
                print("elastic_probe: discovery now lists %s" % (initial + [grown]), flush=True)
        timed_out = proc.poll() is None
        if timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stray workers that outlived horovodrun
        except ProcessLookupError:
            pass
    wall = time.time() - began
    events = read_events(log_dir)
    checks = judge(events, args, kill, grown, timed_out, proc.returncode)
    summary = {"scenario": args.scenario, "kill": args.kill if kill else None, "returncode": proc.returncode,
               "timed_out": timed_out, "wall_s": round(wall, 1), "work": work,
               "checks": {k: v[0] for k, v in checks.items()},
               "failures": [e for e in events if e["ev"] == "collective_failed"],
               "reinits": [e for e in events if e["ev"] == "reinit"],
               "done": [e for e in events if e["ev"] == "done"]}
    return checks, summary


def write_hosts(path, names):
    """The hosts file the discovery script prints: ``names``, one slot each (replaced atomically)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join("%s:1\n" % n for n in names))
    os.replace(tmp, path)


def judge(events, args, kill, grown, timed_out, rc):
    """The feasibility checks, each (passed, evidence)."""
    by = lambda name: [e for e in events if e["ev"] == name]
    done, reinit, failed = by("done"), by("reinit"), by("collective_failed")
    final_size = 3 if grown else (2 if kill else 3)
    checks = {"job finished, exit 0, no watchdog": (not timed_out and rc == 0 and not by("hang"),
                                                    "rc=%s timed_out=%s hangs=%s" % (rc, timed_out, by("hang")))}
    if kill:
        killed = by("killing_self") + by("killed")
        t_kill = killed[0]["t"] if killed else float("inf")
        survivors = {(e["host"], e["pid"]) for e in by("start") if e["t"] < t_kill} - \
            {(e["host"], e["pid"]) for e in killed}
        failed_on = {(e["host"], e["pid"]) for e in failed}
        checks["failed collective raised MXNetError on every survivor"] = (
            bool(survivors) and survivors <= failed_on and all(e["type"] == "mxnet.base.MXNetError" for e in failed),
            ["%s: %s at %s after %.2fs" % (e["host"], e["type"], e["where"], e["after_s"]) for e in failed])
        first_reinit = [e for e in reinit if e["world"] == 2 and e["step"] < args.steps]
        checks["waitall returned, shutdown + init again in the same process"] = (
            {(e["host"], e["pid"]) for e in first_reinit} >= survivors and
            all(e["fresh_op"] == [3.0] * 4 for e in first_reinit),
            ["%s: waitall %s %.2fs, shutdown %.2fs, init %.2fs -> rank %d of %d" % (
                e["host"], e["waitall"], e["waitall_s"], e["shutdown_s"], e["init_s"], e["rank"], e["size"])
             for e in first_reinit])
        drained = [o for e in by("drained") for o in e["outputs"]]
        checks["queued outputs all finished (none stuck)"] = (
            bool(by("drained")), ["%s: %s; then %s" % tuple(o) for o in drained])
        small = [e for e in by("step_ok") if e["size"] == 2]
        checks["exact collectives on the world of 2"] = (bool(small), "%d verified steps on 2 ranks" % len(small))
    if grown:
        synced = [e for e in by("synced") if e["host"] == grown]
        checks["new worker started on the added host and synced"] = (any(e["step"] > 0 for e in synced), synced)
        checks["running workers interrupted by HostsUpdatedInterrupt"] = (
            bool(by("hosts_updated")), ["%s at step %d" % (e["host"], e["step"]) for e in by("hosts_updated")])
        big = [e for e in by("step_ok") if (e["size"] == 3 and e["world"] >= 2) or e["host"] == grown]
        checks["exact collectives on the grown world of 3"] = (bool(big), "%d verified steps" % len(big))
    weights = {e["weight0"] for e in done}
    checks["all finishers agree at the last step"] = (
        len(done) == final_size and all(e["size"] == final_size for e in done) and len(weights) == 1
        and len({e["step"] for e in done}) == 1 and done[0]["step"] >= args.steps,
        ["%s rank %d of %d step %d w0 %s" % (e["host"], e["rank"], e["size"], e["step"], e["weight0"]) for e in done])
    return checks
