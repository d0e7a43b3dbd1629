"""Hosts for multi-host tests on one machine: each one a loopback address (127.0.0.2, 127.0.0.3, ...) served by
a real ``sshd`` of its own, started on a spare port with a throw-away host key and user key, and stopped after.

Horovod's launcher treats an address that is not one of this machine's interface addresses as a remote host and
starts its ranks through ``ssh``, exactly as on a cluster. A host can also see the file system differently: its
``sshd`` then runs in a mount namespace of its own (``unshare -m``) with an empty tmpfs over a folder, so every
rank started there sees that folder empty while the other hosts see its real content.

``ssh`` itself comes through a small wrapper put first on PATH, which adds ``-F`` with a config of the test's
(the throw-away key, no known_hosts file): the user's ~/.ssh is never read or written.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd():
    """Absolute path of sshd (it must be started by one), or None."""
    for path in (shutil.which("sshd"),) + SSHD_CANDIDATES:
        if path and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def why_not_available(need_namespaces=False):
    """None when these hosts can be made here, else the reason (for pytest.skip)."""
    if find_sshd() is None:
        return ("no sshd on this machine (package openssh-server; .ci/run installs it when it runs as root): "
                "multi-host tests need a real sshd per host")
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return "no %s on this machine (package openssh-client)" % tool
    if need_namespaces and (os.geteuid() != 0 or shutil.which("unshare") is None):
        return "a host with its own view of the file system needs root and unshare (a mount namespace for its sshd)"
    return None


def spare_port(addresses):
    """A TCP port free on every one of ``addresses`` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no TCP port free on all of %s" % (addresses,))


def _children():
    """{pid: [child pids]} of every process now."""
    tree = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid):
    """Every process below ``pid`` (children first met first)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_env(pid):
    """Environment of process ``pid`` ({} when it is gone)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode("utf-8", "replace").split("=", 1) for item in items if b"=" in item)


class Host:
    """One sshd on ``address:port``; ``hidden``: a folder this host sees as an empty tmpfs."""

    def __init__(self, address, port, keys, work, hidden=None):
        self.address, self.port, self.hidden = address, port, hidden
        self.work = os.path.join(work, "sshd-" + address)
        os.makedirs(self.work)
        self.log_path = os.path.join(self.work, "sshd.log")
        self.config = os.path.join(self.work, "sshd_config")
        with open(self.config, "w") as f:
            f.write("\n".join([
                "ListenAddress %s:%d" % (address, port),
                "HostKey %s" % keys.host_key,
                "AuthorizedKeysFile %s" % keys.authorized_keys,
                "PidFile %s" % os.path.join(self.work, "sshd.pid"),
                "PermitRootLogin yes", "StrictModes no", "UsePAM no", "PubkeyAuthentication yes",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PrintMotd no",
                "MaxStartups 64", "MaxSessions 64", "LogLevel ERROR", ""]))
        sshd = [find_sshd(), "-D", "-e", "-f", self.config]
        if hidden:
            script = 'mount -t tmpfs -o size=1m pfc-hidden "$1" && shift && exec "$@"'
            sshd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", hidden] + sshd
        self.proc = subprocess.Popen(sshd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_listening()

    def _wait_listening(self, timeout=15.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("sshd on %s:%d did not start; its output:\n%s" % (self.address, self.port, self.log()))

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def sessions(self):
        """Processes started through this sshd (its sessions and what they run)."""
        return descendants(self.proc.pid)

    def kill_sessions(self, sig=signal.SIGKILL):
        for pid in reversed(self.sessions()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self):
        """Kill whatever runs through this host, then its sshd (and with it its mount namespace)."""
        self.kill_sessions()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


class Keys:
    """A throw-away host key, user key and ssh client config in ``work``, and an ``ssh`` wrapper using them."""

    def __init__(self, work):
        self.host_key = os.path.join(work, "host_ed25519")
        self.user_key = os.path.join(work, "id_ed25519")
        for path in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pfc-multihost-test", "-f", path],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True)
        self.authorized_keys = os.path.join(work, "authorized_keys")
        shutil.copyfile(self.user_key + ".pub", self.authorized_keys)
        self.client_config = os.path.join(work, "ssh_config")
        with open(self.client_config, "w") as f:
            f.write("Host *\n  IdentityFile %s\n  IdentitiesOnly yes\n  BatchMode yes\n  UserKnownHostsFile /dev/null\n"
                    "  StrictHostKeyChecking no\n  LogLevel ERROR\n" % self.user_key)
        self.bin = os.path.join(work, "bin")
        os.makedirs(self.bin)
        wrapper = os.path.join(self.bin, "ssh")
        with open(wrapper, "w") as f:
            f.write('#!/bin/sh\nexec %s -F %s "$@"\n' % (shutil.which("ssh"), self.client_config))
        os.chmod(wrapper, 0o755)


class Cluster:
    """Hosts ``addresses`` on one spare port; ``hidden``: {address: folder that host sees as an empty tmpfs}."""

    def __init__(self, addresses=("127.0.0.2", "127.0.0.3"), hidden=None):
        self.work = tempfile.mkdtemp(prefix="pfc-hosts-")
        self.hosts = {}
        try:
            if os.geteuid() == 0:
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)     # sshd's privilege separation folder
            self.keys = Keys(self.work)
            self.port = spare_port(list(addresses))
            for address in addresses:
                self.hosts[address] = Host(address, self.port, self.keys, self.work, (hidden or {}).get(address))
        except BaseException:
            self.stop()
            raise

    def env(self, base=None):
        """An environment whose ``ssh`` is the test's (PATH starts with the wrapper's folder)."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = self.keys.bin + os.pathsep + env.get("PATH", "")
        return env

    def ssh_args(self):
        """horovodrun's own ssh flags, as a user passes them."""
        return ["-p", str(self.port), "--ssh-identity-file", self.keys.user_key]

    def stop(self):
        for host in self.hosts.values():
            host.stop()
        shutil.rmtree(self.work, ignore_errors=True)
