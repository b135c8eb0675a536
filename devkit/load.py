"""What the benchmarks and the chaos run in ops/ share: a free port, a lean HTTP client to
drive the ingress with, percentiles, and where the machine's CPU went (Linux's /proc)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpConnection:
    """A lean keep-alive HTTP/1.1 client connection, so the load generator costs little CPU."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(head.encode() + b"\r\n" + body)
        response = await self.reader.readuntil(b"\r\n\r\n")
        status = int(response[9:12])
        length = 0
        close = False
        for line in response.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"connection" and value.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.reader = self.writer = None
        return status


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == comm:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def print_cpu(
    before: dict[str, float], after: dict[str, float], count: int, seconds: float, unit: str
) -> None:
    """Where the machine's CPU went, per ``unit`` (``count`` of them), over the window."""
    spent = {k: after[k] - before[k] for k in before}
    machine = max(spent.pop("machine"), TICK_S)  # a run too short to register a tick
    spent["kernel and everything else"] = max(0.0, machine - sum(spent.values()))
    n = max(1, count)
    print(f"\n| CPU per {unit} | ms | share |")
    print("|---|---|---|")
    for name, used in spent.items():
        print(f"| {name} | {used * 1000 / n:.2f} | {used / machine:.0%} |")
    print(
        f"| **all** ({machine / seconds:.2f} of {os.cpu_count()} cores busy) "
        f"| **{machine * 1000 / n:.2f}** | 100% |"
    )


def cpu_snapshot(components: dict[str, Callable[[], list[int]]]) -> dict[str, float]:
    """CPU seconds so far per component, and the machine's busy seconds (all cores)."""
    snap = {name: sum(process_cpu_s(pid) for pid in pids()) for name, pids in components.items()}
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
    snap["machine"] = (sum(ticks) - ticks[3] - ticks[4]) * TICK_S
    return snap
