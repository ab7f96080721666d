"""Hosts that are really separate, on one machine: Linux network namespaces joined by veth links.

`NetnsHosts(n)` creates n namespaces ("hosts"), each with one veth interface `llmpy0` on the private subnet
10.213.0.0/24 (host i at 10.213.0.{i+1}), joined by a bridge in a switch namespace of its own; nothing is
created in, and no address given to, the machine's own namespace. `shape(rate)` puts a tbf qdisc on every
host's link (egress), `shape(None)` removes it. `mpiexec(...)` starts ONE mpiexec inside host 0 that launches
every rank through hydra's ssh launcher with a wrapper script that runs `ip netns exec <namespace>` for the
host it is given (the hostfile names the hosts by address), each host with a UTS namespace and a hostname of
its own.

MPICH from the mpich wheel is `ch4:ucx ofi` and picks UCX by default; UCX sees that the namespaces share one
kernel and moves data through shared memory (cma/posix), not the veth link: TCP_ENV forces the network path
(UCX_TLS=tcp,self on the veth device; OFI_TCP_ENV is the libfabric alternative). `counters()` reads the veth
byte counters inside each namespace, so a test proves what crossed the link.

Every namespace is deleted on exit, also on failure (the processes still inside it are killed first), and a
new NetnsHosts removes namespaces left by a harness process that died (same prefix, pid no longer alive).
Needs root and iproute2 (`ip`, `tc`) and util-linux's `unshare`: see `skip_reason()`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "llmpyh"  # namespaces: llmpyh<pid>-h<i>, llmpyh<pid>-sw
SUBNET = "10.213.0"
INTERFACE = "llmpy0"  # the host's end of its link, the same name inside every host namespace
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": INTERFACE}
OFI_TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}
COMMAND_TIMEOUT = 60


def skip_reason() -> str | None:
    """Why the harness cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (iproute2 / util-linux)"
    if not MPIEXEC.exists():
        return f"needs {MPIEXEC} (pip install mpich)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=COMMAND_TIMEOUT)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside `name` (only processes this harness started live there), then delete it."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of harness processes that are gone (prefix PREFIX<pid>-); returns their names."""
    removed = []
    for name in _namespaces():
        found = re.fullmatch(rf"{PREFIX}(\d+)-.*", name)
        if found and not os.path.exists(f"/proc/{found.group(1)}"):
            _delete_namespace(name)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    hostname: str


class NetnsHosts:
    """n namespace hosts on one switch (see the module docstring); a context manager."""

    def __init__(self, count: int = 2):
        if not 2 <= count <= 250:
            raise ValueError(f"NetnsHosts: 2 to 250 hosts, got {count}")
        base = f"{PREFIX}{os.getpid()}"
        self.switch = f"{base}-sw"
        self.hosts = [Host(f"{base}-h{i}", f"{SUBNET}.{i + 1}", f"nshost{i}") for i in range(count)]
        self.rate: str | None = None
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "NetnsHosts":
        remove_leftovers()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for host in self.hosts:
            _delete_namespace(host.namespace)
        _delete_namespace(self.switch)
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            _ip("netns", "add", host.namespace)
            # created inside the namespaces: the machine's own namespace never sees these interfaces
            _ip("link", "add", INTERFACE, "netns", host.namespace, "type", "veth", "peer", "name", f"port{i}",
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"port{i}", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", INTERFACE, "up")
        self._folder = tempfile.TemporaryDirectory(prefix="llmpy-netns-")
        folder = Path(self._folder.name)
        (folder / "hostfile").write_text("".join(f"{h.address}\n" for h in self.hosts))
        cases = "".join(f"  {h.address}) ns={h.namespace}; name={h.hostname};;\n" for h in self.hosts)
        # hydra runs `<launcher-exec> [-x] HOST COMMAND...` as it would run ssh: COMMAND is one shell line
        (folder / "launch").write_text(
            "#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nhost=$1; shift\n"
            f"case \"$host\" in\n{cases}  *) echo \"netns launcher: unknown host $host\" >&2; exit 1;;\nesac\n"
            "exec ip netns exec \"$ns\" unshare --uts sh -c 'hostname \"$0\" && exec sh -c \"$1\"' \"$name\" \"$*\"\n")
        (folder / "launch").chmod(0o755)
        self.hostfile, self.launcher = folder / "hostfile", folder / "launch"

    def shape(self, rate: str | None) -> None:
        """Every host's egress limited to `rate` (tc's units: '1gbit', '2gbit') by a token bucket; None: unshaped."""
        for host in self.hosts:
            if rate is None:
                subprocess.run(["tc", "-n", host.namespace, "qdisc", "del", "dev", INTERFACE, "root"],
                               capture_output=True, timeout=COMMAND_TIMEOUT)
                continue
            result = subprocess.run(["tc", "-n", host.namespace, "qdisc", "replace", "dev", INTERFACE, "root", "tbf",
                                     "rate", rate, "burst", "256kb", "latency", "100ms"],
                                    capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            if result.returncode != 0:
                raise RuntimeError(f"tc tbf {rate} on {host.namespace}: {result.stderr.strip()}")
        self.rate = rate

    def counters(self) -> list[tuple[int, int]]:
        """(tx_bytes, rx_bytes) of every host's veth interface, read inside its namespace."""
        found = []
        for host in self.hosts:
            text = subprocess.run(["ip", "netns", "exec", host.namespace, "cat",
                                   f"/sys/class/net/{INTERFACE}/statistics/tx_bytes",
                                   f"/sys/class/net/{INTERFACE}/statistics/rx_bytes"],
                                  capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT).stdout
            tx, rx = (int(x) for x in text.split())
            found.append((tx, rx))
        return found

    def run_in(self, index: int, command: list, timeout: float, cwd=None, env: dict | None = None):
        """`command` inside host `index` (its network and hostname), killed with everything it started after
        `timeout` seconds."""
        host = self.hosts[index]
        full = ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host.hostname, *map(str, command)]
        return run_with_timeout(full, timeout, cwd, dict(os.environ, **(env or {})))

    def mpiexec(self, ranks_per_host: int, command: list, timeout: float, cwd=None, env: dict | None = None,
                network: dict | None = None):
        """One mpiexec in host 0 starting `ranks_per_host` ranks of `command` on every host; `network`: the MPI
        environment that picks the path (default TCP_ENV). Returns (CompletedProcess, bytes sent per host)."""
        launch = [MPIEXEC, "-f", self.hostfile, "-launcher", "ssh", "-launcher-exec", self.launcher,
                  "-localhost", self.hosts[0].address, "-ppn", ranks_per_host,
                  "-n", ranks_per_host * len(self.hosts), *command]
        before = self.counters()
        result = self.run_in(0, launch, timeout, cwd, dict(TCP_ENV if network is None else network, **(env or {})))
        after = self.counters()
        return result, [a[0] - b[0] for a, b in zip(after, before)]


def run_with_timeout(command: list, timeout: float, cwd, env) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, the whole session killed after `timeout` (then TimeoutExpired)."""
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def send_bytes(hosts: NetnsHosts, size: int, timeout: float = 60) -> float:
    """Seconds to send `size` bytes over TCP from host 1 to host 0 (a check of the shaping)."""
    port = 47113
    server = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
              f"s.bind(('{hosts.hosts[0].address}',{port}));s.listen(1);print('ready',flush=True);c,_=s.accept();n=0\n"
              "while True:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\nprint(n)")
    client = ("import socket,time;s=socket.create_connection(('%s',%d));b=bytes(1<<20);t=time.perf_counter()\n"
              "for _ in range(%d): s.sendall(b)\ns.shutdown(socket.SHUT_WR);s.recv(1);print(time.perf_counter()-t)"
              % (hosts.hosts[0].address, port, size >> 20))
    listener = subprocess.Popen(["ip", "netns", "exec", hosts.hosts[0].namespace, sys.executable, "-c", server],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        sender = subprocess.run(["ip", "netns", "exec", hosts.hosts[1].namespace, sys.executable, "-c", client],
                                capture_output=True, text=True, timeout=timeout, check=True)
        received = int(listener.communicate(timeout=timeout)[0].strip())
        if received != (size >> 20) << 20:
            raise RuntimeError(f"sent {size} bytes, {received} arrived")
        return float(sender.stdout.strip())
    finally:
        if listener.poll() is None:
            os.killpg(listener.pid, signal.SIGKILL)
            listener.wait()
        time.sleep(0)
