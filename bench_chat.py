"""bench_chat.py: start chat.py, drive it with real WebSocket clients, print the numbers.

    python bench_chat.py                                   # SQLite, one process
    python bench_chat.py --database postgresql://postgres@127.0.0.1/postgres --workers 2
    DATABASE_URL=postgresql://postgres@127.0.0.1/postgres python bench_chat.py   # the same server
    python bench_chat.py --quick                           # a few seconds: does it work?

It starts `python chat.py` itself (`--workers N` processes on N ports, clients spread over them,
as behind a load balancer), on a fresh database: a temporary SQLite file, or a new database on the
PostgreSQL server you name (dropped afterwards). Every message is stored.

Rate limits are for humans, not load tests: the server is started with RATE_PER_SECOND,
RATE_BURST, MAX_CONNECTIONS_PER_IP, MAX_CONNECTIONS and SEND_QUEUE_FRAMES raised (see BENCH_ENV).
The load generator is this one Python process (uvloop), on the same machine as the server.
"""

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import asyncpg
import uvloop
from websockets.asyncio.client import connect

HERE = pathlib.Path(__file__).parent
BENCH_ENV = {"RATE_PER_SECOND": "1e9", "RATE_BURST": "1e9", "MAX_CONNECTIONS_PER_IP": "1000000",
             "MAX_CONNECTIONS": "1000000", "SEND_QUEUE_FRAMES": "100000"}
CONTENT = re.compile(r'"content":"s(\d+):(\d+):([\d.]+)"')


# --- The server under test -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_database(admin_url: str | None):
    """A temporary SQLite file, or a new database on the given PostgreSQL server."""
    if not admin_url:
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    name = f"chat_bench_{os.getpid()}"

    async def run(sql):
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(run(f"DROP DATABASE {name} WITH (FORCE)"))


@contextlib.contextmanager
def servers(database_url: str, workers: int):
    """`workers` chat.py processes on one database; yields their ws:// URLs and processes."""
    processes, urls = [], []
    try:
        for _ in range(workers):
            port = free_port()
            env = {**os.environ, **BENCH_ENV, "DATABASE_URL": database_url, "PORT": str(port)}
            processes.append(subprocess.Popen([sys.executable, "chat.py"], cwd=HERE, env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"ws://127.0.0.1:{port}/ws")
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ws-info", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or processes[-1].poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.1)
        yield urls, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"the server (pid {process.pid}) did not stop within 30 s of SIGTERM; killed",
                      file=sys.stderr)
                process.kill()


def cpu_seconds(processes) -> float:
    """User + system CPU time the server processes have used so far."""
    total = 0
    for process in processes:
        fields = pathlib.Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(processes) -> int:
    total = 0
    for process in processes:
        for line in pathlib.Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# --- Clients -------------------------------------------------------------------------------------


class Receiver:
    """One client's view: which of each sender's messages arrived, in what order, how late."""

    def __init__(self, senders: int, per_sender: int):
        self.seen = [bytearray(per_sender) for _ in range(senders)]
        self.highest = [-1] * senders
        self.latencies: list[float] = []
        self.duplicated = self.out_of_order = self.received = 0

    def take(self, text: str) -> tuple[int, int] | None:
        match = CONTENT.search(text)
        if not match:
            return None
        sender, seq, sent = int(match[1]), int(match[2]), float(match[3])
        self.latencies.append(time.perf_counter() - sent)
        self.received += 1
        if self.seen[sender][seq]:
            self.duplicated += 1
        elif seq < self.highest[sender]:
            self.out_of_order += 1
        self.seen[sender][seq] = 1
        self.highest[sender] = max(self.highest[sender], seq)
        return sender, seq


async def join(url: str, name: str, room: str):
    ws = await connect(f"{url}/{room}", compression=None, max_queue=None, ping_interval=None,
                       open_timeout=60)
    await ws.send(json.dumps({"type": "join", "username": name}))
    while not (await ws.recv()).startswith('{"type":"system","room":"%s","content":"Welcome' % room):
        pass
    return ws


async def open_clients(urls: list[str], count: int, room: str, prefix: str = "u", room_size: int = 0):
    """`count` joined clients, spread over the servers; in rooms of `room_size` if given."""
    rooms = [f"{room}{n // room_size}" if room_size else room for n in range(count)]
    batches = [join(urls[n % len(urls)], f"{prefix}{n}", rooms[n]) for n in range(count)]
    clients = []
    for start in range(0, count, 200):  # not all at once: the handshake backlog is finite
        clients += await asyncio.gather(*batches[start:start + 200])
    return clients


async def run_load(urls, room: str, clients: int, senders: int, per_sender: int,
                   rate: float | None, window: int = 50) -> dict:
    """Senders send per_sender messages each, at `rate` messages a second in all, or flat out
    with at most `window` unanswered each; every client counts what reaches it."""
    sockets = await open_clients(urls, clients, room)
    receivers = [Receiver(senders, per_sender) for _ in sockets]
    expected = senders * per_sender
    echoed = [asyncio.Event() for _ in range(senders)]
    acked = [0] * senders

    async def receive(ws, receiver: Receiver, index: int):
        async for text in ws:
            got = receiver.take(text)
            if got and index < senders and got[0] == index:
                acked[index] += 1
                echoed[index].set()
            if receiver.received >= expected:
                return

    async def send(ws, index: int):
        interval = senders / rate if rate else 0
        next_at = time.perf_counter() + (index / rate if rate else 0)  # evenly spaced, not in bursts
        for seq in range(per_sender):
            if rate:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            else:
                while seq - acked[index] >= window:
                    echoed[index].clear()
                    await echoed[index].wait()
            await ws.send('{"type":"message","content":"s%d:%d:%.6f"}' % (index, seq, time.perf_counter()))

    started = time.perf_counter()
    readers = [asyncio.create_task(receive(ws, r, n)) for n, (ws, r) in enumerate(zip(sockets, receivers, strict=True))]
    await asyncio.gather(*(send(sockets[n], n) for n in range(senders)))
    done, pending = await asyncio.wait(readers, timeout=30)
    elapsed = time.perf_counter() - started
    for task in pending:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    latencies = sorted(x for r in receivers for x in r.latencies)
    received = sum(r.received for r in receivers)
    unique = sum(sum(seen) for r in receivers for seen in r.seen)
    return {
        "deliveries": received,
        "per_second": received / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "lost": expected * clients - unique,
        "duplicated": sum(r.duplicated for r in receivers),
        "out_of_order": sum(r.out_of_order for r in receivers),
    }


async def idle_memory(urls, processes, count: int) -> tuple[float, int]:
    """Server memory per joined, idle connection, with `count` of them open."""
    before = rss_bytes(processes)
    # Rooms of ten: in one room of thousands, each join would notify everyone before it.
    sockets = await open_clients(urls, count, "idle", prefix="i", room_size=10)
    await asyncio.sleep(2)
    after = rss_bytes(processes)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return (after - before) / count, len(sockets)


# --- Main ----------------------------------------------------------------------------------------


async def measure(urls, processes, quick: bool) -> list[tuple[str, str]]:
    seconds = 2 if quick else 10
    scenarios = [("latency", f"{r} msg/s to {c} clients", c, 10, r) for r, c in
                 ([(50, 10)] if quick else [(500, 50), (200, 200)])]
    scenarios.append(("flat out", f"10 senders, {20 if quick else 200} clients, as fast as possible",
                      20 if quick else 200, 10, None))
    rows = []
    for n, (kind, label, clients, senders, rate) in enumerate(scenarios):
        per_sender = int(rate * seconds / senders) if rate else (100 if quick else 500)
        cpu = cpu_seconds(processes)
        result = await run_load(urls, f"bench{n}", clients, senders, per_sender, rate)
        cpu_us = 1e6 * (cpu_seconds(processes) - cpu) / max(1, result["deliveries"])
        rows.append((f"{kind}: {label}",
                     f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                     f"{result['per_second']:,.0f} deliveries/s, {cpu_us:.1f} µs server CPU per delivery; "
                     f"lost {result['lost']}, duplicated {result['duplicated']}, "
                     f"out of order {result['out_of_order']}"))
    per_connection, opened = await idle_memory(urls, processes, 200 if quick else 10000)
    rows.append((f"idle: {opened} joined connections", f"{per_connection / 1024:.1f} kB server memory each"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", default=os.environ.get("DATABASE_URL", "").startswith("postgres")
                        and os.environ["DATABASE_URL"] or None,
                        help="a PostgreSQL server URL; a fresh database is made on it "
                             "(default: DATABASE_URL if PostgreSQL, else a temporary SQLite file)")
    parser.add_argument("--workers", type=int, default=1, help="chat.py processes (PostgreSQL only for >1)")
    parser.add_argument("--quick", action="store_true", help="small and short: check that it works")
    args = parser.parse_args()
    if args.workers > 1 and not args.database:
        raise SystemExit("several workers need PostgreSQL: --database postgresql://...")
    backend = "PostgreSQL" if args.database else "SQLite"
    with fresh_database(args.database) as url, servers(url, args.workers) as (urls, processes):
        rows = uvloop.run(measure(urls, processes, args.quick))
        print(f"chat.py, {backend}, {args.workers} process(es); {os.cpu_count()} cores "
              f"({platform.processor() or platform.machine()}), server, database and load generator "
              f"on the same machine; Python {platform.python_version()}", flush=True)
        print("  limits lifted for the load test: " + ", ".join(f"{k}={v}" for k, v in BENCH_ENV.items()),
              flush=True)
        for scenario, result in rows:
            print(f"  {scenario:55} {result}", flush=True)


if __name__ == "__main__":
    main()
