"""The hosts helper: hosts reach each other over TCP, partitions cut and heal, cleanup leaves nothing behind."""

import subprocess
import sys

import pytest

from megatron_opd.testing import netns
from megatron_opd.testing.netns import HostNet, netns_unavailable_reason

REASON = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")

PORT = 7070
# accepts connections forever; answers each with a greeting naming its address
SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(b"hello from " + sys.argv[1].encode())
    conn.close()
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as conn:
    print(conn.recv(100).decode())
"""


def project_objects() -> list[str]:
    """Names of this project's namespaces and links that exist now (any process's)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names += [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return [name for name in names if netns._NAME.match(name)]


def own_objects(net: HostNet) -> list[str]:
    mine = {net.bridge, *net._veths, *(h.netns for h in net.hosts)}
    return [name for name in project_objects() if name in mine]


def start_server(net: HostNet, host: int) -> subprocess.Popen:
    server = net.popen(host, [sys.executable, "-c", SERVER, net.hosts[host].addr, str(PORT)],
                       stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    return server


def connect(net: HostNet, host: int, addr: str, timeout: float = 2.0) -> subprocess.CompletedProcess:
    return net.run(host, [sys.executable, "-c", CLIENT, addr, str(PORT), str(timeout)], timeout=30)


def test_hosts_talk_partition_and_heal():
    with HostNet(n_hosts=2) as net:
        assert [h.addr for h in net.hosts] == ["198.18.0.11", "198.18.0.12"]
        assert len(own_objects(net)) == 5  # bridge, 2 veths, 2 namespaces
        routes = net.run(1, ["ip", "route"]).stdout
        assert "default" not in routes and "198.18.0.0/24 dev eth0" in routes  # nowhere but the test range
        assert "UP" in net.run(1, ["ip", "link", "show", "lo"]).stdout
        server = start_server(net, 0)

        ok = connect(net, 1, net.hosts[0].addr)
        assert ok.returncode == 0 and ok.stdout.strip() == "hello from 198.18.0.11", ok.stderr
        # the server listens on host 0's address only: not reachable on host 1's own loopback
        assert connect(net, 1, "127.0.0.1").returncode != 0

        net.link_down(1)
        cut = connect(net, 1, net.hosts[0].addr)
        assert cut.returncode != 0 and ("timed out" in cut.stderr or "No route" in cut.stderr), cut.stderr
        net.link_up(1)
        healed = connect(net, 1, net.hosts[0].addr, timeout=10)
        assert healed.returncode == 0 and healed.stdout.strip() == "hello from 198.18.0.11", healed.stderr
        assert server.poll() is None
        # a host crash takes everything inside, also processes that left the launched command's group
        net.run(0, ["bash", "-c", "setsid sleep 300 > /dev/null 2>&1 &"])
        net.kill_host(0)
        assert server.poll() is not None
        assert net.run(0, ["true"]).returncode == 0  # the host itself stays usable (a reboot)
        left = subprocess.run(["ip", "netns", "pids", net.hosts[0].netns], capture_output=True, text=True)
        assert left.stdout.split() == []
    assert own_objects(net) == []


def test_cleanup_when_the_body_raises_kills_even_escaped_processes():
    with pytest.raises(RuntimeError, match="body failed"):
        with HostNet(n_hosts=2) as net:
            server = start_server(net, 0)
            # a process that leaves its process group (new session): only the namespace sweep finds it
            escaped = net.run(1, ["bash", "-c", "setsid sleep 300 > /dev/null 2>&1 & echo $!"]).stdout
            escaped_pid = int(escaped)
            raise RuntimeError("body failed")
    assert server.poll() is not None
    assert subprocess.run(["ps", "-p", str(escaped_pid), "-o", "stat="], capture_output=True,
                          text=True).stdout.strip()[:1] in ("", "Z")  # gone (or a zombie awaiting init)
    assert own_objects(net) == []


def test_leftovers_of_a_dead_process_are_removed_by_the_next_net():
    # a child builds hosts, starts a process in one and dies without cleaning up (os._exit skips atexit)
    child = subprocess.run([sys.executable, "-c", (
        "import os, subprocess\n"
        "from megatron_opd.testing.netns import HostNet\n"
        "net = HostNet(n_hosts=2).start()\n"
        "net.popen(0, ['sleep', '300'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(os.getpid(), flush=True)\n"
        "os._exit(0)\n")], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    dead = f"opd{int(child.stdout)}."
    assert len([n for n in project_objects() if n.startswith(dead)]) == 5
    with HostNet(n_hosts=1):
        assert [n for n in project_objects() if n.startswith(dead)] == []


def test_command_line_up_exec_down():
    cli = [sys.executable, "-m", "megatron_opd.testing.netns"]
    tag = ["--tag", "clitest"]  # leaves the hosts a person made with the default tag alone
    subprocess.run([*cli, "down", *tag], check=True, capture_output=True)
    try:
        up = subprocess.run([*cli, "up", "2", *tag], capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert "host1\topdclitest.0h1\t198.18.0.12" in up.stdout
        addr = subprocess.run([*cli, "exec", *tag, "host1", "--", "ip", "-o", "-4", "addr", "show", "eth0"],
                              capture_output=True, text=True, timeout=30)
        assert "198.18.0.12/24" in addr.stdout, addr.stderr
    finally:
        down = subprocess.run([*cli, "down", *tag], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "removed 5 object(s)" in down.stdout, down.stdout + down.stderr
    assert [n for n in project_objects() if n.startswith("opdclitest.")] == []
