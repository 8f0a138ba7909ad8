"""A cluster on one box: N "hosts" as Linux network namespaces on one bridge (tests and trying things out).

Each host is a network namespace with ``lo`` and one interface ``eth0`` (a veth whose other end sits on a
bridge in the root namespace), addressed from the reserved benchmarking range 198.18.0.0/24 (RFC 2544):
the bridge is 198.18.0.1, host ``i`` is 198.18.0.(11+i). There is no default route and no NAT, so a
process inside a host reaches only the other hosts, the bridge address and its own loopback. The hosts
share everything else with the machine: the file system (so a checkpoint directory is "shared storage"),
the hostname, users and the process table.

    with HostNet(n_hosts=2) as net:
        server = net.popen(0, ["python", "-m", "http.server", "--bind", net.hosts[0].addr, "8000"])
        net.run(1, ["curl", f"http://{net.hosts[0].addr}:8000/"], timeout=10)
        net.link_down(1)   # host 1 is cut off (its veth is down) ...
        net.link_up(1)     # ... and back
        net.kill_host(0)   # a crash: SIGKILL everything running inside host 0

Leaving the ``with`` block (normally, by an exception or Ctrl-C; ``atexit`` as a backstop) kills every
process started in the hosts (SIGTERM to each recorded process group, SIGKILL after a short grace, then
SIGKILL to anything still inside a host namespace), and deletes the namespaces, the veths and the bridge.
Object names carry the creating process's pid (``opd<pid>.<n>br``, ``opd<pid>.<n>v<i>``, ``opd<pid>.<n>h<i>``)
so concurrent test processes never collide, and a new HostNet removes the leftovers of dead processes.
Hosts of two live HostNets never see each other (separate bridges, no forwarding); only traffic from the
root namespace to 198.18.0.0/24 goes to the bridge made first, so keep one HostNet at a time when the
root namespace must talk to the hosts.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; ``netns_unavailable_reason()`` says why not.
Command line (the hosts outlive the command; their names carry the tag ``cli``, or ``--tag WORD``, and
no test removes them; the tests' own command-line hosts use ``--tag clitest``):

    python -m megatron_opd.testing.netns up 3          # hosts host0..host2 = 198.18.0.11..13
    python -m megatron_opd.testing.netns exec host1 -- python -c 'print(1)'
    python -m megatron_opd.testing.netns down          # kill what runs inside, delete everything
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

SUBNET_PREFIX = "198.18.0."
PREFIX_LEN = 24
BRIDGE_ADDR = SUBNET_PREFIX + "1"
FIRST_HOST_OCTET = 11
MAX_HOSTS = 64
HOST_IFNAME = "eth0"
CLI_TAG = "cli"
TERM_GRACE_S = 2.0
# opd<tag>.<instance><role>: tag = pid of the creating process, or a word for hosts made by the command
# line (never removed as stale), role br | v<i> | h<i>
_NAME = re.compile(r"^opd(?P<tag>\d+|[a-z][a-z0-9]*)\.(?P<inst>[0-9a-z])(?P<role>br|v\d+|h\d+)$")
_TAG_WORD = re.compile(r"^[a-z][a-z0-9]{0,6}$")  # a word, short enough for 15-character interface names
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Host:
    """One host: ``name`` for people (host0, host1...), ``netns`` for ``ip netns``, its address on ``ifname``."""

    name: str
    netns: str
    addr: str
    ifname: str = HOST_IFNAME


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


@functools.lru_cache(maxsize=1)
def netns_unavailable_reason() -> str | None:
    """None when this machine can build hosts (root, iproute2, netns + veth + bridge work), else why not."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces, veth pairs and bridges need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    try:
        with HostNet(n_hosts=1):  # a real probe: some containers are root yet forbid netns/veth/bridge
            pass
    except Exception as error:  # noqa: BLE001 - any failure means "not here", reported as text
        return f"cannot build a test host here: {error}"
    return None


def _netns_names() -> list[str]:
    # `ip netns list` prints "name" or "name (id: N)"
    lines = _ip("netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def _link_names() -> list[str]:
    lines = _ip("-o", "link", "show", check=False).stdout.splitlines()
    # "7: name@peer: <...>" -> name
    return [line.split(":")[1].strip().split("@")[0] for line in lines if line.count(":") >= 2]


def _kill_netns_processes(netns: str, deadline_s: float = 5.0) -> None:
    """SIGKILL every process inside ``netns`` and wait (up to ``deadline_s``) until none is left."""
    end = time.monotonic() + deadline_s
    while True:
        pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split() if p.isdigit()]
        if not pids or time.monotonic() > end:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete_objects(matches) -> None:
    """Delete the namespaces (after killing what runs in them), veths and bridges named in ``matches``."""
    netns = [name for name, role in matches if role.startswith("h")]
    for name in netns:
        if name in _netns_names():
            _kill_netns_processes(name)
    existing_links = set(_link_names())
    # veths first (their peers vanish with them), then the bridges
    for name, role in sorted(matches, key=lambda item: item[1] == "br"):
        if not role.startswith("h") and name in existing_links:
            _ip("link", "del", name, check=False)
    for name in netns:
        _ip("netns", "del", name, check=False)


def _all_objects() -> list[tuple[str, re.Match]]:
    return [(name, m) for name in _netns_names() + _link_names() if (m := _NAME.match(name))]


def remove_stale() -> int:
    """Remove hosts left behind by processes that died without cleaning up; returns how many objects."""
    stale = [(name, m["role"]) for name, m in _all_objects()
             if m["tag"].isdigit() and not psutil.pid_exists(int(m["tag"]))]
    _delete_objects(stale)
    return len(stale)


class HostNet:
    """``n_hosts`` network-namespace hosts on one bridge; a context manager that always cleans up."""

    _instances = 0
    _live: set[HostNet] = set()

    def __init__(self, n_hosts: int, *, tag: str | None = None):
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be in 1..{MAX_HOSTS}, got {n_hosts}")
        self.n_hosts = n_hosts
        if tag is None:  # one process's HostNets get instances 0, 1, ... (base 36, 1 char)
            self._tag, self._inst = str(os.getpid()), _B36[HostNet._instances % len(_B36)]
            HostNet._instances += 1
        else:
            self._tag, self._inst = tag, "0"
        base = f"opd{self._tag}.{self._inst}"
        self.bridge = base + "br"
        self._veths = [f"{base}v{i}" for i in range(n_hosts)]
        self.hosts = [Host(name=f"host{i}", netns=f"{base}h{i}", addr=f"{SUBNET_PREFIX}{FIRST_HOST_OCTET + i}")
                      for i in range(n_hosts)]
        self._procs: list[subprocess.Popen] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> HostNet:
        """Build the bridge and the hosts (removes dead processes' leftovers first)."""
        remove_stale()
        if self.bridge in _link_names():
            raise RuntimeError(f"bridge {self.bridge} exists already (another live HostNet with this name)")
        self._started = True
        HostNet._live.add(self)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{BRIDGE_ADDR}/{PREFIX_LEN}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host, veth in zip(self.hosts, self._veths):
                self._add_host(host, veth)
        except BaseException:
            self.close()
            raise
        return self

    def _add_host(self, host: Host, veth: str) -> None:
        _ip("netns", "add", host.netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", host.ifname, "netns", host.netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.addr}/{PREFIX_LEN}", "dev", host.ifname)
        _ip("-n", host.netns, "link", "set", host.ifname, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every process started in the hosts, then delete namespaces, veths and bridge (idempotent)."""
        if not self._started:
            return
        self._stop_processes()
        _delete_objects([(h.netns, "h") for h in self.hosts] + [(v, "v") for v in self._veths]
                        + [(self.bridge, "br")])
        self._started = False
        HostNet._live.discard(self)

    def detach(self) -> None:
        """Leave the hosts up after this process exits (the CLI's ``up``); ``down`` removes them."""
        HostNet._live.discard(self)
        self._started = False

    def __enter__(self) -> HostNet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop_processes(self) -> None:
        running = [p for p in self._procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)  # the whole session's group: children started by the command too
            end = time.monotonic() + TERM_GRACE_S
            while running and time.monotonic() < end:
                running = [p for p in running if p.poll() is None]
                time.sleep(0.05)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._procs.clear()

    # -- using the hosts ---------------------------------------------------------------------------
    def _host(self, host: int | str) -> Host:
        for index, candidate in enumerate(self.hosts):
            if host in (index, candidate.name, candidate.addr, candidate.netns):
                return candidate
        raise KeyError(f"no host {host!r}; hosts are {[h.name for h in self.hosts]} "
                       f"(or their index 0..{self.n_hosts - 1} / address)")

    def command(self, host: int | str, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``'s network namespace."""
        return ["ip", "netns", "exec", self._host(host).netns, *map(str, argv)]

    def popen(self, host: int | str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` in a new session; killed (with its process group) on close."""
        if not self._started:
            raise RuntimeError("HostNet is not started (use `with HostNet(...) as net`)")
        proc = subprocess.Popen(self.command(host, argv), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: int | str, argv: list[str], *, timeout: float | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` to completion (output captured as text unless told otherwise)."""
        kwargs.setdefault("text", True)
        if not {"stdout", "stderr", "capture_output"} & kwargs.keys():
            kwargs["capture_output"] = True
        if kwargs.pop("capture_output", False):
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        proc = self.popen(host, argv, **kwargs)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def kill_host(self, host: int | str) -> None:
        """A host crash: SIGKILL every process inside ``host`` (whatever its process group) and wait for them."""
        _kill_netns_processes(self._host(host).netns)
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)  # reap ours (the sweep skips zombies' namespaces)

    def link_down(self, host: int | str) -> None:
        """Partition ``host``: its veth goes down on the bridge side (its own ``eth0`` keeps its address)."""
        _ip("link", "set", self._veths[self.hosts.index(self._host(host))], "down")

    def link_up(self, host: int | str) -> None:
        """Heal a partition made by ``link_down``. Also forgets every host's neighbour (ARP) entries: ARP
        probes made during the partition leave FAILED entries, and a connection right after healing
        would then fail with "No route to host" for a few seconds."""
        _ip("link", "set", self._veths[self.hosts.index(self._host(host))], "up")
        for each in self.hosts:
            _ip("-n", each.netns, "neigh", "flush", "dev", each.ifname, check=False)


@atexit.register
def _close_live_nets() -> None:  # backstop for nets whose `with` never ran its exit (e.g. os._exit skips this)
    for net in list(HostNet._live):
        net.close()


# -- command line -----------------------------------------------------------------------------------
def _cli_hosts(tag: str) -> list[Host]:
    names = sorted((m["role"], name) for name, m in _all_objects()
                   if m["tag"] == tag and m["role"].startswith("h"))
    return [Host(name=f"host{int(role[1:])}", netns=name, addr=f"{SUBNET_PREFIX}{FIRST_HOST_OCTET + int(role[1:])}")
            for role, name in sorted(names, key=lambda item: int(item[0][1:]))]


def _cli_down(tag: str) -> int:
    objects = [(name, m["role"]) for name, m in _all_objects() if m["tag"] == tag]
    _delete_objects(objects)
    return len(objects)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_opd.testing.netns",
                                     description="Hosts as network namespaces on one bridge (198.18.0.0/24).")
    tagged = argparse.ArgumentParser(add_help=False)
    tagged.add_argument("--tag", default=CLI_TAG,
                        help=f"which set of hosts, a short word (default {CLI_TAG}); several sets can be up")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("up", parents=[tagged], help="create N hosts (host0 = 198.18.0.11, ...) that stay up").add_argument(
        "n_hosts", type=int)
    sub.add_parser("down", parents=[tagged], help="kill what runs in the hosts and delete them")
    sub.add_parser("list", parents=[tagged], help="print the hosts: name, namespace, address")
    exec_parser = sub.add_parser("exec", parents=[tagged], help="run a command inside a host: exec HOST -- CMD...")
    exec_parser.add_argument("host", help="host0, 0, or its address")
    exec_parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not _TAG_WORD.match(args.tag):
        parser.error(f"--tag must be a lowercase word of 1-7 letters/digits starting with a letter, got {args.tag!r}")

    reason = netns_unavailable_reason() if args.action == "up" else None
    if reason:
        parser.error(reason)
    if args.action == "up":
        if _cli_hosts(args.tag):
            parser.error(f"hosts tagged {args.tag!r} are up already; run `down` first")
        net = HostNet(args.n_hosts, tag=args.tag).start()
        net.detach()
        args.action = "list"
    if args.action == "down":
        print(f"removed {_cli_down(args.tag)} object(s)")
    elif args.action == "list":
        for host in _cli_hosts(args.tag):
            print(f"{host.name}\t{host.netns}\t{host.addr}")
    else:
        hosts = {key: h for h in _cli_hosts(args.tag) for key in (h.name, h.addr, h.name.removeprefix("host"))}
        if args.host not in hosts:
            parser.error(f"no host {args.host!r}; up: {sorted(h.name for h in _cli_hosts(args.tag)) or 'none'}")
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("give a command: exec HOST -- CMD...")
        os.execvp("ip", ["ip", "netns", "exec", hosts[args.host].netns, *cmd])
    return 0


if __name__ == "__main__":
    sys.exit(main())
