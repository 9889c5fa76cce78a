"""What a running service holds, read from outside: /proc for memory, descriptors and UDP
sockets, its control socket for its live calls and event-loop tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from voiceline.bench.runner import rss_mb
from voiceline.control import CONTROL_SOCKET, request

_NET_UDP = ("/proc/{pid}/net/udp", "/proc/{pid}/net/udp6")


@dataclass(frozen=True)
class Sample:
    label: str
    calls_placed: int
    calls_up: int  # the service's calls now
    rss_mb: float
    fds: int
    tasks: int
    udp_sockets: int
    rtp_ports: int  # its UDP sockets bound in its RTP range


def sample(label: str, pid: int, data_dir: Path, rtp_ports: tuple[int, int], calls_placed: int) -> Sample:
    """One reading (blocking: run it in a thread from an event loop)."""
    status = request(data_dir / CONTROL_SOCKET, "status")
    ports = udp_ports(pid)
    low, high = rtp_ports
    return Sample(
        label=label,
        calls_placed=calls_placed,
        calls_up=int(status["calls"]),
        rss_mb=rss_mb(pid),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        tasks=int(status["tasks"]),
        udp_sockets=len(ports),
        rtp_ports=sum(1 for port in ports if low <= port <= high),
    )


def udp_ports(pid: int) -> list[int]:
    """The local ports of the UDP sockets process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in _NET_UDP:
        try:
            lines = Path(table.format(pid=pid)).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                ports.append(int(fields[1].rpartition(":")[2], 16))
    return ports


HEADER = (
    f"{'':<7} {'placed':>7} {'up':>5} {'RSS MB':>7} {'fds':>5} {'tasks':>6} {'UDP socks':>9} {'RTP ports':>9}"
)


def format_sample(row: Sample) -> str:
    return (
        f"{row.label:<7} {row.calls_placed:>7} {row.calls_up:>5} {row.rss_mb:>7.1f} {row.fds:>5} {row.tasks:>6} "
        f"{row.udp_sockets:>9} {row.rtp_ports:>9}"
    )
