"""bench_chat.py: start chat.py (or a peer), drive it with real WebSocket clients, print the numbers.

    python bench_chat.py                                   # SQLite, one process
    python bench_chat.py --database postgresql://postgres@127.0.0.1/postgres --workers 2
    DATABASE_URL=postgresql://postgres@127.0.0.1/postgres python bench_chat.py   # the same server
    python bench_chat.py --quick                           # a few seconds: does it work? (any mode)
    python bench_chat.py --url ws://127.0.0.1:8000/ws --pid 1234       # a server already running
    python bench_chat.py --compare /work/shared/tutorial-app --runs 3  # chat.py vs the tutorial app
    python bench_chat.py --compare /tmp/before/chat.py --runs 3        # vs another checkout's chat.py
    python bench_chat.py --compare ../shared/starlette-floor --only idle,storm   # vs the stack's floor
    python bench_chat.py --scaling --database postgresql://postgres@127.0.0.1/postgres --runs 3
    python bench_chat.py --reconnect 10000 --runs 3      # restart chat.py under 10,000 joined clients
    python bench_chat.py --hold 17500 --minutes 3        # 17,500 joined clients stay three minutes
    python bench_chat.py --scaling /tmp/before/chat.py --database postgresql://...   # vs another chat.py

By default it starts `python chat.py` (`--workers N` processes on N ports, clients spread over them,
as behind a load balancer) on a fresh database: a temporary SQLite file, or a new database on the
PostgreSQL server you name (dropped afterwards), with the rate and connection limits, which are for
humans, lifted (BENCH_ENV). Every message is stored.

--url drives a running server that speaks the tutorial's protocol (messages carry the username);
lift its limits yourself, and give --pid for its CPU and memory figures.

--compare TARGET runs the same scenarios on this checkout's chat.py and on TARGET, alternating,
--runs times each, each run on a freshly started server and fresh database, and prints medians,
ranges and the ratio of the medians (only same-run ratios mean anything on a noisy machine).
TARGET is a folder with setup.sh and run.sh (the tutorial app, on its own database, emptied by
`setup.sh --reset` before each run), a folder with app.py (the stack's floor, a bare Starlette
endpoint under stock uvicorn, ../shared/starlette-floor: give it `--only idle,storm`, as it stores
and numbers nothing), or a chat.py file (e.g. from `git worktree add /tmp/before HEAD~1`). All load
goes to the plain /ws path (the tutorial app has no rooms), and idle connections are open but not
joined.

Besides the message loads: `idle` opens 10,000 connections and holds them (time, server CPU per
connection, memory per connection), `storm` has 2,000 (`--storm N`) connected clients join one room
at once (time until all are in, join latency, joins not welcomed within 60 s, CPU per join).
Asked for by name only (`--only replays`, chat against chat: the tutorial app has no `since`),
`replays` has 90 clients rejoin a room of 400 messages at once with since=0 while a client in it
sends a message every 10 ms (time until all are replayed, the longest round trip of those messages).

--reconnect N restarts `python chat.py` (SIGTERM, then a new process on the same database and port)
under N clients joined in rooms of ten, one talker in each saying a message a second; each client
rejoins with `since` as /test does (back-off with jitter). It prints the time from SIGTERM until
every client is back, the server's CPU per client back, the p99 of live deliveries meanwhile, and
what any client lost, got twice or out of order, against the stored messages of its room. The
tutorial app cannot run it (no `since`).

--hold N has N clients join `python chat.py` in rooms of ten and stay for --minutes (default 3)
while the server pings each (PING_INTERVAL) and one client in each room says a message a second
(a twentieth of the rooms every 50 ms):
minute by minute, the server's CPU and the p50 and p99 of those deliveries; memory per joined
client; connections dropped; what any client lost, got twice or out of order. Each loopback source
address (127.0.0.1, 127.0.0.2, ...) opens at most 10,000 of them, so that past about 28,000 the
ports to connect from do not run out; past about 20,000 both this process and the server need a
raised `ulimit -n`.

--scaling (PostgreSQL) runs the write-heavy scenario (each sender alone in its room, so every stored
message is delivered once) on 1, 2 and 4 chat.py processes, alternating over --runs rounds; given
another checkout's chat.py, on both, alternating, with the ratio of their medians. It prints where
the CPU went per stored message (chat's processes, PostgreSQL's if it runs on this machine, the load
generator) and how busy the whole machine was: when it is near 100%, more processes cannot help.

The load generator is this one Python process on the same machine (uvloop and a minimal WebSocket
client on asyncio.Protocol); it prints its own CPU use, to show whether it is the limit.
"""

import argparse
import array
import asyncio
import contextlib
import datetime
import itertools
import json
import math
import os
import pathlib
import platform
import random
import re
import sqlite3
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

import asyncpg
import uvloop

HERE = pathlib.Path(__file__).parent
BENCH_ENV = {"RATE_PER_SECOND": "1e9", "RATE_BURST": "1e9", "MAX_CONNECTIONS_PER_IP": "1000000",
             "MAX_CONNECTIONS": "1000000", "SEND_QUEUE_FRAMES": "100000", "JOINS_PER_MINUTE": "1000000000"}
CONTENT = re.compile(rb'"content":"s(\d+):(\d+):([\d.]+)"')
WINDOW = 50  # flat out: unacknowledged messages per sender
STALL_SECONDS = 10  # a flat-out sender whose messages stop coming back gives up; the rest counts as lost
DRAIN_SECONDS = 30  # after the last send, how long to wait for every delivery


# --- The servers under test ----------------------------------------------------------------------


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
def launched(commands: list[tuple[list[str], pathlib.Path, dict, int]]):
    """Start each (argv, cwd, env, port), wait until it answers GET /ws-info; yield the pids; SIGTERM."""
    processes = []
    try:
        for argv, cwd, env, port in commands:
            processes.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ws-info", timeout=1)
                    break
                except urllib.error.HTTPError:  # it answers (the floor has no /ws-info)
                    break
                except OSError:
                    if time.monotonic() > deadline or processes[-1].poll() is not None:
                        raise SystemExit(f"the server did not start: {shlex.join(argv)}") from None
                    time.sleep(0.1)
        yield [process.pid for process in processes]
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


@contextlib.contextmanager
def chat_servers(script: pathlib.Path, admin_url: str | None, workers: int):
    """`workers` processes of a chat.py on one fresh database; yields their ws:// URLs and pids."""
    with fresh_database(admin_url) as database_url:
        ports = [free_port() for _ in range(workers)]
        env = {**os.environ, **BENCH_ENV, "DATABASE_URL": database_url}
        commands = [([sys.executable, script.name], script.parent, {**env, "PORT": str(port)}, port)
                    for port in ports]
        with launched(commands) as pids:
            yield [f"ws://127.0.0.1:{port}/ws" for port in ports], pids


@contextlib.contextmanager
def tutorial_server(folder: pathlib.Path):
    """The tutorial app on its own database, emptied first (it keeps every message it stores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PORT")}  # chat's, not its
    setup = subprocess.run(["./setup.sh", "--reset"], cwd=folder, env=env, capture_output=True, text=True)
    if setup.returncode:
        raise SystemExit(f"{folder}/setup.sh --reset failed:\n{setup.stdout}{setup.stderr}")
    port = free_port()
    with launched([(["./run.sh", str(port)], folder, env, port)]) as pids:  # run.sh execs bun
        yield [f"ws://127.0.0.1:{port}/ws"], pids


@contextlib.contextmanager
def floor_server(folder: pathlib.Path):
    """The stack's floor: a bare Starlette WebSocket endpoint (app.py) under stock uvicorn."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--ws-per-message-deflate", "false",
            "--log-level", "warning"]
    with launched([(argv, folder, dict(os.environ), port)]) as pids:
        yield [f"ws://127.0.0.1:{port}/ws"], pids


def cpu_seconds(pids, reaped: bool = False) -> float:
    """User + system CPU time these processes have used so far (one that has gone counts 0), and
    with `reaped`, their children's that have ended (a PostgreSQL backend's, once it has gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            total += reaped and int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def database_cpu_seconds() -> float | None:
    """CPU time PostgreSQL's processes on this machine have used so far (None: none here)."""
    pids = []
    for comm in pathlib.Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text() == "postgres\n":
                pids.append(comm.parent.name)
    return cpu_seconds(pids, reaped=True) if pids else None  # monotonic: a backend's CPU outlives it


def machine_busy() -> tuple[float, float]:
    """Busy and all CPU time of the whole machine so far (the first line of /proc/stat)."""
    user, nice, system, idle, iowait, *rest = map(int, pathlib.Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + sum(rest), user + nice + system + idle + iowait + sum(rest)


def rss_bytes(pids) -> int:
    total = 0
    for pid in pids:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# --- A minimal WebSocket client ------------------------------------------------------------------


class Socket(asyncio.Protocol):
    """The client side of RFC 6455, just enough for this benchmark: no compression, no extensions,
    no TLS. Measured here, the `websockets` client cost 9-16 µs of CPU per delivered frame and this
    one 6-10 µs (mostly the kernel and the event loop now): more of the shared cores for the server."""

    def __init__(self, host: str, path: str):
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()  # fixed key
        loop = asyncio.get_running_loop()
        self.connected, self.lost = loop.create_future(), loop.create_future()  # handshake done, TCP gone
        self.buffer = bytearray()
        self.fragments: list[bytes] = []  # a message split into continuation frames, so far
        self.closing = False
        self.pings = 0  # the server's pings answered
        self.on_text = lambda payload: None  # called with the payload of every complete message
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc):
        if not self.connected.done():
            self.connected.set_exception(ConnectionError("closed during the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes):
        self.buffer += data
        if not self.connected.done():  # still in the HTTP upgrade: wait for the whole response head
            head, blank, rest = self.buffer.partition(b"\r\n\r\n")
            if not blank:
                return
            status = bytes(head.split(b"\r\n", 1)[0])
            if b" 101 " not in status:
                self.connected.set_exception(ConnectionError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.connected.set_result(None)
            self.buffer = rest
        buffer, start, end = self.buffer, 0, len(self.buffer)
        while end - start >= 2:  # one frame: FIN/opcode byte, length byte, [extended length], payload
            first, length, at = buffer[start], buffer[start + 1] & 0x7F, start + 2  # servers don't mask
            if length >= 126:
                size = 2 if length == 126 else 8
                if end - at < size:
                    break
                length, at = int.from_bytes(buffer[at:at + size], "big"), at + size
            if end - at < length:
                break
            start = at + length
            self.frame(first, buffer[at:start])  # a copy: the buffer moves on
        del buffer[:start]

    def frame(self, first: int, payload: bytearray):
        opcode = first & 0x0F
        if opcode in (0x0, 0x1, 0x2):  # continuation, text, binary
            if not first & 0x80:  # not FIN: more of this message follows
                self.fragments.append(payload)
                return
            if self.fragments:
                payload, self.fragments = b"".join(self.fragments) + payload, []
            self.on_text(payload)
        elif opcode == 0x9:  # PING: answer with the same payload
            self.pings += 1
            self.write(0xA, payload)
        elif opcode == 0x8:  # CLOSE: answer it (unless it answers ours), then hang up
            if not self.closing:
                self.closing = True
                self.write(0x8, payload[:2])
            self.transport.close()

    def write(self, opcode: int, payload: bytes):
        """One final frame. Clients must mask; with the all-zero key the payload is sent as is.
        Every frame this client sends fits the 7-bit length (control frames must, by the RFC)."""
        if len(payload) > 125:
            raise ValueError(f"a {len(payload)}-byte frame: this client sends only short ones")
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload)

    def send(self, text: str):
        self.write(0x1, text.encode())

    async def close(self):
        """CLOSE 1000, then give the server a moment to close the TCP connection first."""
        if not self.closing and not self.transport.is_closing():
            self.closing = True
            self.write(0x8, (1000).to_bytes(2, "big"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), 2)
        self.transport.abort()


async def dial(url: str, source: str | None = None) -> Socket:
    """A handshake from `source` (a loopback address: each has about 28,000 ports to connect from)."""
    parts = urllib.parse.urlsplit(url)
    _, sock = await asyncio.get_running_loop().create_connection(
        lambda: Socket(parts.netloc, parts.path or "/"), parts.hostname, parts.port or 80,
        local_addr=(source, 0) if source else None)
    await asyncio.wait_for(sock.connected, 60)
    return sock


async def join(url: str, name: str) -> Socket:
    """A client joined as `name`: both servers say `Welcome name!` when it is in."""
    sock = await dial(url)
    welcome, marker = asyncio.get_running_loop().create_future(), f"Welcome {name}!".encode()

    def wait_for_welcome(payload: bytes):
        if marker in payload and not welcome.done():
            welcome.set_result(None)

    sock.on_text = wait_for_welcome
    sock.send('{"type":"join","username":"%s"}' % name)
    await asyncio.wait((welcome, sock.lost), timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not welcome.done():
        raise ConnectionError(f"{url}: {name} was not welcomed (refused, or no answer within 60 s)")
    return sock


async def open_clients(urls: list[str], paths: list[str], names: list[str] | None) -> list[Socket]:
    """One client per path (appended to a server URL, spread over the servers), joined as `names`."""
    opening = [join(urls[n % len(urls)] + path, names[n]) if names else dial(urls[n % len(urls)] + path)
               for n, path in enumerate(paths)]
    clients = []
    for start in range(0, len(opening), 200):  # not all at once: the handshake backlog is finite
        clients += await asyncio.gather(*opening[start:start + 200])
    return clients


async def leave(sockets: list[Socket], names: list[str]):
    """Leave, wait until the server has gone quiet (the tutorial app forgets a user only on leave,
    after a database write), then close: the next scenario joins under the same names."""
    heard = time.perf_counter()

    def note(payload: bytes):
        nonlocal heard
        heard = time.perf_counter()

    for sock, name in zip(sockets, names, strict=True):
        sock.on_text = note
        sock.send('{"type":"leave","username":"%s"}' % name)
    deadline = time.perf_counter() + 10
    while time.perf_counter() - heard < 0.3 and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.gather(*(sock.close() for sock in sockets))


# --- Scenarios -----------------------------------------------------------------------------------


class Scenario(NamedTuple):
    kind: str  # latency, flat out, write-heavy, idle, storm
    label: str
    clients: int
    senders: int = 0
    rate: float | None = None  # messages a second in all, or None: flat out with WINDOW
    per_sender: int = 0


def load_scenarios(quick: bool) -> list[Scenario]:
    seconds, clients = (2, 20) if quick else (10, 200)
    rows = [Scenario("latency", f"{r} msg/s to {c} clients", c, 10, r, r * seconds // 10)
            for r, c in ([(50, 10)] if quick else [(500, 50), (200, 200)])]
    return rows + [Scenario("flat out", f"10 senders, {clients} clients, as fast as possible", clients, 10,
                            None, 100 if quick else 500)]


def write_heavy(quick: bool) -> Scenario:
    return Scenario("write-heavy", "10 senders alone in their rooms, flat out", 10, 10, None,
                    100 if quick else 5000)


class Receiver:
    """One client's view: which of each sender's messages arrived, in what order, how late."""

    def __init__(self, index: int, s: Scenario, expected: int, since: float, finished):
        self.index, self.expected, self.since, self.finished = index, expected, since, finished
        self.seen = [bytearray(s.per_sender) for _ in range(s.senders)]
        self.highest = [-1] * s.senders
        self.latencies: list[float] = []
        self.duplicated = self.out_of_order = self.received = self.acked = 0
        self.echo = asyncio.Event()  # set when one of this client's own messages comes back

    def take(self, payload: bytearray):
        """Every message frame; those sent before this scenario began (history on join) are skipped.
        It runs once per delivery, so it is written for speed."""
        match = CONTENT.search(payload)
        if match is None:
            return
        sender, seq, sent = match.groups()
        sent = float(sent)
        if sent < self.since:
            return
        sender, seq = int(sender), int(seq)
        self.latencies.append(time.perf_counter() - sent)
        self.received += 1
        seen = self.seen[sender]
        if seen[seq]:
            self.duplicated += 1
        elif seq < self.highest[sender]:
            self.out_of_order += 1
        else:
            self.highest[sender] = seq
        seen[seq] = 1
        if sender == self.index:
            self.acked += 1
            self.echo.set()
        if self.received == self.expected:
            self.finished()


async def run_load(urls, pids, s: Scenario, room: str) -> dict:
    """Senders (the first clients) send per_sender messages each, at `rate` messages a second in
    all, or flat out with at most WINDOW unanswered each; every client counts what reaches it.
    Write-heavy: each sender alone in its own room. Measured from the first send to the last delivery."""
    alone = s.kind == "write-heavy"
    names = [f"{'w' if alone else 'u'}{n}" for n in range(s.clients)]
    sockets = await open_clients(urls, [f"/w{n}" if alone else room for n in range(s.clients)], names)
    all_in, waiting = asyncio.get_running_loop().create_future(), s.clients

    def finished():
        nonlocal waiting
        waiting -= 1
        if not waiting and not all_in.done():
            all_in.set_result(None)

    since = time.perf_counter()
    expected = s.per_sender * (1 if alone else s.senders)
    receivers = [Receiver(n, s, expected, since, finished) for n in range(s.clients)]
    for sock, receiver in zip(sockets, receivers, strict=True):
        sock.on_text = receiver.take

    async def send(n: int):
        receiver, interval = receivers[n], s.senders / s.rate if s.rate else 0
        next_at = time.perf_counter() + (n / s.rate if s.rate else 0)  # evenly spaced, not in bursts
        for seq in range(s.per_sender):
            if s.rate:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            while not s.rate and seq - receiver.acked >= WINDOW:
                receiver.echo.clear()
                try:
                    await asyncio.wait_for(receiver.echo.wait(), STALL_SECONDS)
                except TimeoutError:
                    return
            sockets[n].send('{"type":"message","username":"%s","content":"s%d:%d:%.6f"}'
                            % (names[n], n, seq, time.perf_counter()))

    cpu, own_cpu, started = cpu_seconds(pids), time.process_time(), time.perf_counter()
    database_cpu, busy = database_cpu_seconds(), machine_busy()
    await asyncio.gather(*(send(n) for n in range(s.senders)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in, DRAIN_SECONDS)
    elapsed = time.perf_counter() - started
    server_cpu, own_cpu = cpu_seconds(pids) - cpu, time.process_time() - own_cpu
    if database_cpu is not None:
        database_cpu = database_cpu_seconds() - database_cpu
    busy = [after - before for after, before in zip(machine_busy(), busy)]
    await leave(sockets, names)
    latencies = sorted(x for r in receivers for x in r.latencies)
    received = sum(r.received for r in receivers)
    return {
        "per_second": received / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "cpu_us": 1e6 * server_cpu / max(1, received) if pids else None,
        "generator_pct": 100 * own_cpu / elapsed,
        "generator_cpu_us": 1e6 * own_cpu / max(1, received),
        "database_cpu_us": 1e6 * database_cpu / max(1, received) if database_cpu is not None else None,
        "machine_busy_pct": 100 * busy[0] / max(1, busy[1]),
        "lost": expected * s.clients - sum(sum(seen) for r in receivers for seen in r.seen),
        "duplicated": sum(r.duplicated for r in receivers),
        "out_of_order": sum(r.out_of_order for r in receivers),
    }


async def idle_memory(urls, pids, s: Scenario, joined: bool) -> dict:
    """What arriving and waiting cost: connections opened (200 at a time), and joined in rooms of
    ten (in one room of thousands, each join would notify everyone before it) or not joined; the
    time to open them all, the server's CPU per connection, and its memory per idle connection."""
    if not pids:
        return {"kb_each": None, "seconds": None, "cpu_us": None}
    before, cpu, started = rss_bytes(pids), cpu_seconds(pids), time.perf_counter()
    paths = [f"/idle{n // 10}" for n in range(s.clients)] if joined else [""] * s.clients
    sockets = await open_clients(urls, paths, [f"i{n}" for n in range(s.clients)] if joined else None)
    seconds, cpu = time.perf_counter() - started, cpu_seconds(pids) - cpu
    await asyncio.sleep(2)
    after, dropped = rss_bytes(pids), sum(sock.lost.done() for sock in sockets)
    await asyncio.gather(*(sock.close() for sock in sockets))
    if dropped:
        print(f"the server closed {dropped} of the {s.clients} idle connections: lift its limits",
              file=sys.stderr)
        return {"kb_each": None, "seconds": None, "cpu_us": None}
    return {"kb_each": (after - before) / s.clients / 1024, "seconds": seconds, "cpu_us": cpu / s.clients * 1e6}


async def join_storm(urls, pids, s: Scenario) -> dict:
    """Clients that are connected all join one room at once (a restart, the start of a class):
    every join tells everyone in before it. The time until the last is welcomed, each join's
    latency (its frame sent to its welcome), joins not welcomed within 60 s, and the server's
    CPU per join and memory per joined connection."""
    before = rss_bytes(pids) if pids else 0
    sockets = await open_clients(urls, [""] * s.clients, None)
    loop, cpu = asyncio.get_running_loop(), cpu_seconds(pids)
    waits = []
    for n, sock in enumerate(sockets):
        welcomed, marker = loop.create_future(), f"Welcome s{n}!".encode()

        def wait_for_welcome(payload: bytes, welcomed=welcomed, marker=marker):
            if marker in payload and not welcomed.done():
                welcomed.set_result(time.perf_counter())

        sock.on_text = wait_for_welcome
        waits.append(welcomed)
    started, sent = time.perf_counter(), []
    for n, sock in enumerate(sockets):
        sent.append(time.perf_counter())
        sock.send('{"type":"join","username":"s%d"}' % n)
    await asyncio.wait(waits, timeout=60)
    seconds, cpu = time.perf_counter() - started, cpu_seconds(pids) - cpu
    latencies = sorted(welcomed.result() - at for welcomed, at in zip(waits, sent) if welcomed.done())
    await asyncio.sleep(2)
    after = rss_bytes(pids) if pids else 0
    await asyncio.gather(*(sock.close() for sock in sockets))
    return {"seconds": seconds, "timed_out": s.clients - len(latencies),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
            "cpu_us": cpu / s.clients * 1e6 if pids else None,
            "kb_each": (after - before) / s.clients / 1024 if pids else None}


async def replay_storm(urls, pids, s: Scenario) -> dict:
    """Clients that come back all rejoin one room at once with since=0, each replayed the room's
    REPLAYED messages, while a client in the room sends a message every 10 ms and times each one's
    return: do replays hold live messages up? The time until the last replay is in (its newest
    message reached), replays not in within 60 s, the longest round trip of a live message
    meanwhile, and the server's CPU per replay. (Only chat replays: the tutorial app has no since.)"""
    loop, url = asyncio.get_running_loop(), urls[0] + "/replays"
    seeder, seeded, last = await join(url, "seeder"), loop.create_future(), b'"content":"history %d ' % (REPLAYED - 1)
    seeder.on_text = lambda payload: last in payload and not seeded.done() and seeded.set_result(None)
    for n in range(REPLAYED):
        seeder.send('{"type":"message","username":"seeder","content":"history %d %s"}' % (n, "h" * 60))
    await asyncio.wait_for(seeded, 60)
    probe, sockets = await join(url, "probe"), await open_clients(urls[:1], ["/replays"] * s.clients, None)
    waits = []
    for sock in sockets:
        replayed = loop.create_future()
        sock.on_text = lambda payload, replayed=replayed: last in payload and not replayed.done() and replayed.set_result(None)
        waits.append(replayed)
    stop, round_trips = asyncio.Event(), []

    async def probing():
        for n in itertools.count():
            echoed, marker = loop.create_future(), b'"content":"probe %d"' % n
            probe.on_text = lambda payload, echoed=echoed, marker=marker: (
                marker in payload and not echoed.done() and echoed.set_result(None))
            sent = time.perf_counter()
            probe.send('{"type":"message","username":"probe","content":"probe %d"}' % n)
            await asyncio.wait_for(echoed, 60)
            round_trips.append(time.perf_counter() - sent)
            if stop.is_set():
                return
            await asyncio.sleep(0.01)

    probing_task = asyncio.create_task(probing())
    await asyncio.sleep(0.2)
    cpu, started = cpu_seconds(pids), time.perf_counter()
    for n, sock in enumerate(sockets):
        sock.send('{"type":"join","username":"r%d","since":0}' % n)
    await asyncio.wait(waits, timeout=60)
    seconds, cpu = time.perf_counter() - started, cpu_seconds(pids) - cpu
    await asyncio.sleep(0.2)
    stop.set()
    await probing_task
    await asyncio.gather(*(sock.close() for sock in [seeder, probe, *sockets]))
    return {"seconds": seconds, "not_in": sum(not wait.done() for wait in waits), "probe_max_ms": 1000 * max(round_trips),
            "cpu_us": cpu / s.clients * 1e6 if pids else None}


REPLAYED = 400  # messages in the room the replay storm's clients come back to
ONLY: set[str] = set()  # --only: the kinds of scenario to run (all if empty)
STORM = [2000]  # --storm: clients in the join storm


def wanted(kind: str) -> bool:
    return not ONLY or kind.split()[0] in ONLY


async def measure(urls, pids, quick: bool, rooms: bool, writes: bool) -> list[tuple[Scenario, dict]]:
    """The load scenarios (in rooms of their own, or all on the plain path), idle memory
    (joined in rooms, or not joined), then, if `writes`, the write-heavy scenario."""
    rows = [(s, await run_load(urls, pids, s, f"/bench{n}" if rooms else ""))
            for n, s in enumerate(load_scenarios(quick)) if wanted(s.kind)]
    count = 200 if quick else 10000
    label = f"{count} joined connections" if rooms else f"{count} connections, open, not joined"
    idle = Scenario("idle", label, count)
    if wanted("idle"):
        rows.append((idle, await idle_memory(urls, pids, idle, joined=rooms)))
    size = 100 if quick else STORM[0]
    storm = Scenario("storm", f"{size} clients join one room at once", size)
    if wanted("storm"):
        rows.append((storm, await join_storm(urls, pids, storm)))
    if "replays" in ONLY:
        replays = Scenario("replays", f"{10 if quick else 90} clients rejoin with since=0 at once, "
                                      f"{REPLAYED} messages each", 10 if quick else 90)
        rows.append((replays, await replay_storm(urls, pids, replays)))
    if writes and wanted("write-heavy"):
        s = write_heavy(quick)
        rows.append((s, await run_load(urls, pids, s, "")))
    return rows


# --- Reports -------------------------------------------------------------------------------------


def number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if isinstance(value, int) or abs(value) >= 100 else f"{value:.1f}"


def result_line(s: Scenario, r: dict) -> str:
    if s.kind in ARRIVAL_FIGURES:
        return ", ".join(f"{label} {number(r[key])}" for key, label in ARRIVAL_FIGURES[s.kind])
    unit = "message" if s.kind == "write-heavy" else "delivery"
    cpu = "server CPU n/a (no --pid)" if r["cpu_us"] is None else f"{r['cpu_us']:.1f} µs server CPU per {unit}"
    rate = (f"{r['per_second']:,.0f} messages stored/s, {cpu}" if s.kind == "write-heavy" else
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['per_second']:,.0f} deliveries/s, {cpu}")
    return (f"{rate}, load generator {r['generator_pct']:.0f}% of a core; lost {r['lost']}, "
            f"duplicated {r['duplicated']}, out of order {r['out_of_order']}")


ARRIVAL_FIGURES = {  # (result key, label) of the scenarios that measure arriving and waiting
    "idle": [("seconds", "s to open all"), ("cpu_us", "server CPU µs per connection"),
             ("kb_each", "kB server memory each")],
    "storm": [("seconds", "s until all joined"), ("p50_ms", "join p50 ms"), ("p99_ms", "join p99 ms"),
              ("timed_out", "joins timed out"), ("cpu_us", "server CPU µs per join"),
              ("kb_each", "kB server memory each")],
    "replays": [("seconds", "s until all replayed"), ("not_in", "replays not in within 60 s"),
                ("probe_max_ms", "longest live round trip ms"), ("cpu_us", "server CPU µs per replay")]}


def figures(rows: list[tuple[Scenario, dict]]) -> dict[tuple[str, str], float | None]:
    """One run's figures by (scenario, figure), for the comparison table."""
    out = {}
    for s, r in rows:
        scenario = f"{s.kind}: {s.label}"
        if s.kind in ARRIVAL_FIGURES:
            out.update({(scenario, label): r[key] for key, label in ARRIVAL_FIGURES[s.kind]})
            continue
        if s.kind == "latency":
            out[scenario, "p50 ms"], out[scenario, "p99 ms"] = r["p50_ms"], r["p99_ms"]
        else:
            out[scenario, "messages stored/s" if s.kind == "write-heavy" else "deliveries/s"] = r["per_second"]
        out[scenario, "server CPU µs per delivery"] = r["cpu_us"]
        out[scenario, "load generator % of a core"] = r["generator_pct"]
        for key in ("lost", "duplicated", "out_of_order"):
            out[scenario, key.replace("_", " ")] = r[key]
    return out


def summary(values: list[float | None]) -> tuple[float | None, str]:
    """Median and min-max of one figure over the runs."""
    known = [v for v in values if v is not None]
    if not known:
        return None, "n/a"
    return statistics.median(known), f"{number(min(known))}-{number(max(known))}"


def header(title: str, command: bool = True) -> None:
    """The first line (and the command line): when, on what, with which Python."""
    models = re.findall(r"model name\s*:\s*(.+)", pathlib.Path("/proc/cpuinfo").read_text())
    print(f"{title}; {datetime.date.today().isoformat()}, {os.cpu_count()} cores "
          f"({models[0] if models else platform.machine()}), servers, database and load generator "
          f"on the same machine; Python {platform.python_version()}", flush=True)
    if command:
        print(f"  command: {shlex.join(['python', *sys.argv])}", flush=True)


def database_label(admin_url: str | None) -> str:
    return f"PostgreSQL (a fresh database on {admin_url.rsplit('/', 1)[0]})" if admin_url else "SQLite"


# --- Modes ---------------------------------------------------------------------------------------


def single(args) -> None:
    """One server: this checkout's chat.py (started here), or the one at --url."""
    if args.url:
        target = contextlib.nullcontext(([args.url], [args.pid] if args.pid else []))
        title = f"{args.url} (already running, pid {args.pid or 'n/a'})"
    else:
        target = chat_servers(HERE / "chat.py", args.database, args.workers)
        title = f"chat.py, {'PostgreSQL' if args.database else 'SQLite'}, {args.workers} process(es)"
    with target as (urls, pids):
        rows = uvloop.run(measure(urls, pids, args.quick, rooms=not args.url, writes=not args.url))
    header(title, command=False)
    limits = ", ".join(f"{k}={v}" for k, v in BENCH_ENV.items())
    print("  limits: as the server was started (lift its rate limits first)" if args.url else
          f"  limits lifted for the load test: {limits}", flush=True)
    for s, r in rows:
        print(f"  {s.kind + ': ' + s.label:55} {result_line(s, r)}", flush=True)


def compare(args) -> None:
    """This checkout's chat.py against a peer, alternating, --runs times each."""
    peer_path = pathlib.Path(args.compare).resolve()
    if (peer_path / "run.sh").exists() and (peer_path / "setup.sh").exists():
        peer, peer_label = (lambda: tutorial_server(peer_path)), f"tutorial app {peer_path}"
        peer_database, peer_rooms = "PostgreSQL database 'tutorial' (its own; emptied before each run)", False
    elif (peer_path / "app.py").exists():
        peer, peer_label = (lambda: floor_server(peer_path)), f"the stack's floor, {peer_path}/app.py"
        peer_database, peer_rooms = "no database (in memory), stock uvicorn", False
    elif peer_path.is_file() and peer_path.suffix == ".py":
        peer, peer_label = (lambda: chat_servers(peer_path, args.database, args.workers)), str(peer_path)
        peer_database = f"{args.workers} process(es), {database_label(args.database)}, the same limits lifted"
        peer_rooms = True
    else:
        raise SystemExit(f"--compare: {peer_path} is not a folder with setup.sh and run.sh, nor one with app.py, "
                         "nor a .py file")
    targets = {"chat": (lambda: chat_servers(HERE / "chat.py", args.database, args.workers), True),
               "peer": (peer, peer_rooms)}
    runs = {"chat": [], "peer": []}
    for n in range(args.runs):
        for name, (start, rooms) in targets.items():
            print(f"  run {n + 1} of {args.runs}: {name}", file=sys.stderr, flush=True)
            with start() as (urls, pids):
                runs[name].append(figures(uvloop.run(measure(urls, pids, args.quick, rooms=False, writes=rooms))))
    header(f"chat.py vs peer, {args.runs} run(s) each, alternating, each on a fresh server and database")
    print(f"  chat: {HERE / 'chat.py'}, {args.workers} process(es), {database_label(args.database)}; "
          "limits lifted: " + ", ".join(f"{k}={v}" for k, v in BENCH_ENV.items()))
    print(f"  peer: {peer_label}, {peer_database}")
    print("  all load on the plain /ws path; server CPU is the server's processes only (not PostgreSQL's)")
    print(f"  {'':30} {'chat median (range)':>28} {'peer median (range)':>28} {'chat/peer':>9}")
    section = None
    for scenario, figure in runs["chat"][0] | runs["peer"][0]:
        if scenario != section:
            section = scenario
            print(f"  {scenario}")
        (chat, chat_range), (other, other_range) = (summary([run.get((scenario, figure)) for run in runs[name]])
                                                    for name in ("chat", "peer"))
        ratio = f"{chat / other:.2f}" if chat is not None and other else "n/a"
        print(f"    {figure:28} {number(chat) + ' (' + chat_range + ')':>28} "
              f"{number(other) + ' (' + other_range + ')':>28} {ratio:>9}", flush=True)


def scaling(args) -> None:
    """The write-heavy scenario on 1, 2 and 4 chat.py processes sharing one PostgreSQL database;
    with a peer (another checkout's chat.py), the same for it, alternating."""
    counts, s = (1, 2, 4), write_heavy(args.quick)
    scripts = {"chat": HERE / "chat.py"}
    if args.scaling:
        scripts["peer"] = pathlib.Path(args.scaling).resolve()
        if not scripts["peer"].is_file():
            raise SystemExit(f"--scaling: no chat.py at {scripts['peer']}")
    results = {(name, count): [] for name in scripts for count in counts}
    for n in range(args.runs):
        for count in counts:
            for name, script in scripts.items():
                print(f"  round {n + 1} of {args.runs}: {name}, {count} process(es)", file=sys.stderr, flush=True)
                with chat_servers(script, args.database, count) as (urls, pids):
                    result = uvloop.run(run_load(urls, pids, s, ""))
                results[name, count].append(result)
                if result["lost"] or result["duplicated"] or result["out_of_order"]:
                    print(f"  {name}, {count} process(es): {result_line(s, result)}", file=sys.stderr)
    header(f"chat.py write-heavy scaling, {database_label(args.database)}, {args.runs} round(s), "
           f"process counts {'and servers ' if len(scripts) > 1 else ''}alternating")
    print(f"  write-heavy: {s.label}, {s.per_sender} messages each, window {WINDOW}")
    for name, script in scripts.items():
        print(f"  {name}: {script}")
        one = statistics.median(r["per_second"] for r in results[name, 1])
        for count in counts:
            runs = results[name, count]
            median, spread = summary([r["per_second"] for r in runs])
            cpu = {key: number(summary([r[key] for r in runs])[0])
                   for key in ("cpu_us", "database_cpu_us", "generator_cpu_us", "machine_busy_pct")}
            print(f"    {count} process(es): {number(median)} messages stored/s median ({spread}), "
                  f"{median / one if one else float('nan'):.2f}x one process; lost/duplicated/out of order: "
                  f"{sum(r['lost'] + r['duplicated'] + r['out_of_order'] for r in runs)}\n"
                  f"      CPU per message: {cpu['cpu_us']} µs chat, {cpu['database_cpu_us']} µs PostgreSQL, "
                  f"{cpu['generator_cpu_us']} µs load generator; machine busy {cpu['machine_busy_pct']}%",
                  flush=True)
    if len(scripts) > 1:
        median = {key: statistics.median(r["per_second"] for r in runs) for key, runs in results.items()}
        ratios = ", ".join(f"{count}: {median['chat', count] / median['peer', count]:.2f}x" for count in counts)
        print(f"  chat/peer, messages stored/s by process count: {ratios}", flush=True)


# --- The reconnect storm --------------------------------------------------------------------------


def reconnect_delay(tries: int) -> float:
    """As /test waits before its next try: a random point in the upper half of a doubling ceiling."""
    ceiling = min(30.0, 0.5 * 2 ** tries)
    return ceiling / 2 + random.random() * ceiling / 2


class Member:
    """A client of the storm: joined to its room, it rejoins with `since` whenever its socket goes,
    and keeps every message id it got, to check against what was stored."""

    def __init__(self, url: str, room: str, name: str, source: str | None = None):
        self.url, self.room, self.name, self.source = url, room, name, source
        self.ids: list[int] = []
        self.duplicated = self.out_of_order = self.dropped = 0
        self.back_at: float | None = None  # when it was last welcomed
        self.sent, self.took = array.array("d"), array.array("d")  # live talkers' messages: sent at, seconds to arrive
        self.sock: Socket | None = None

    def on_text(self, payload: bytes, welcomed: asyncio.Future) -> None:
        frame = json.loads(payload)
        if frame["type"] == "system" and frame["content"].startswith("Welcome") and not welcomed.done():
            self.back_at = time.perf_counter()  # now: the replay that follows is not live
            welcomed.set_result(self.back_at)
        if frame["type"] != "message":
            return
        if frame["id"] in self.ids[-50:] or (self.ids and frame["id"] < self.ids[-1]):
            self.duplicated += frame["id"] in self.ids
            self.out_of_order += frame["id"] not in self.ids
            return
        self.ids.append(frame["id"])
        if frame["content"].startswith("t:") and self.back_at is not None:
            sent = float(frame["content"][2:])
            if self.back_at <= sent:  # live: it was in the room when the message was sent (not a replay)
                self.sent.append(sent)
                self.took.append(time.perf_counter() - sent)

    async def live(self, stopping: asyncio.Event) -> None:
        tries = 0
        while not stopping.is_set():
            try:
                self.sock = await dial(self.url + "/" + self.room, self.source)
            except (OSError, ConnectionError, TimeoutError):
                tries += 1
                await asyncio.sleep(reconnect_delay(tries))
                continue
            welcomed = asyncio.get_running_loop().create_future()
            self.sock.on_text = lambda payload, welcomed=welcomed: self.on_text(payload, welcomed)
            since = f',"since":{self.ids[-1]}' if self.ids else ""
            self.sock.send('{"type":"join","username":"%s"%s}' % (self.name, since))
            await asyncio.wait((welcomed, self.sock.lost), timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if welcomed.done():
                self.back_at, tries = welcomed.result(), 0
            await self.sock.lost
            self.dropped += not stopping.is_set()
            self.back_at = None  # not in its room: what is sent now reaches it as a replay, not live
            tries += 1
            if not stopping.is_set():
                await asyncio.sleep(reconnect_delay(tries))


async def talk(members: list[Member], stopping: asyncio.Event, per_second: float, turns: int = 1) -> None:
    """Each of these members says the time every 1/per_second seconds while it is in its room: all
    at once, or a part of them in each of `turns` turns over that time (people do not talk in step)."""
    while not stopping.is_set():
        for turn in range(turns):
            for member in members[turn::turns]:
                if member.sock and member.back_at and not member.sock.lost.done():
                    member.sock.send('{"type":"message","content":"t:%.6f"}' % time.perf_counter())
            await asyncio.sleep(1 / per_second / turns)


def stored_ids(database_url: str) -> dict[str, list[int]]:
    """Every stored message id, room by room, in id order (as the server has stored them)."""
    if database_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(database_url.split("///", 1)[1])) as db:
            rows = db.execute("SELECT room, id FROM messages ORDER BY id").fetchall()
    else:
        async def fetch():
            connection = await asyncpg.connect(database_url)
            try:
                return await connection.fetch("SELECT room, id FROM messages ORDER BY id")
            finally:
                await connection.close()
        rows = asyncio.run(fetch())
    rooms: dict[str, list[int]] = {}
    for room, id in rows:
        rooms.setdefault(room, []).append(id)
    return rooms


def start_chat(env: dict, port: int) -> subprocess.Popen:
    """python chat.py, once it answers."""
    process = subprocess.Popen([sys.executable, "chat.py"], cwd=HERE, env={**env, "PORT": str(port)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ws-info", timeout=1)
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("chat.py did not start") from None
            time.sleep(0.05)


PER_ADDRESS = 10_000  # clients from each loopback source address (127.0.0.1, 127.0.0.2, ...)


async def arrive(port: int, clients: int, stopping: asyncio.Event) -> tuple[list[Member], list[asyncio.Task]]:
    """`clients` members joined in rooms of ten, from as many source addresses as they need; or as
    many as joined before the server refused the rest for a minute (full: its socket budget)."""
    members = [Member(f"ws://127.0.0.1:{port}/ws", f"r{k // 10}", f"m{k}", f"127.0.0.{1 + k // PER_ADDRESS}")
               for k in range(clients)]
    tasks = []
    for start in range(0, clients, 200):  # as open_clients: the handshake backlog is finite
        chunk, deadline = members[start:start + 200], time.perf_counter() + 60
        tasks += [asyncio.create_task(m.live(stopping)) for m in chunk]
        while not all(m.back_at for m in chunk) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        if not all(m.back_at for m in chunk):
            for member, task in zip(members[start:], tasks[start:]):
                if not member.back_at:
                    task.cancel()
                    if member.sock:
                        member.sock.transport.abort()
            joined = [m for m in members if m.back_at]
            print(f"only {len(joined)} of {clients} clients joined: the server refused the others for a minute "
                  "(full? python chat.py holds its file-descriptor limit less a tenth, at least 64)", file=sys.stderr, flush=True)
            return joined, tasks
    return members, tasks


async def storm_once(database_url: str, clients: int) -> dict:
    loop, port = asyncio.get_running_loop(), free_port()
    env = {**os.environ, **BENCH_ENV, "DATABASE_URL": database_url}
    server = await loop.run_in_executor(None, start_chat, env, port)
    stopping = asyncio.Event()
    members, tasks = await arrive(port, clients, stopping)
    talkers = asyncio.create_task(talk(members[::10], stopping, 1.0))
    await asyncio.sleep(3)

    def restart() -> subprocess.Popen:  # SIGTERM: clients get 1001, and accepted messages are stored
        server.terminate()
        server.wait(timeout=60)
        return start_chat(env, port)

    restarted, generator = time.perf_counter(), time.process_time()
    server = await loop.run_in_executor(None, restart)
    cpu = cpu_seconds([server.pid])
    while not all(m.back_at and m.back_at > restarted for m in members):
        await asyncio.sleep(0.05)
        if time.perf_counter() - restarted > 600:
            break
    seconds, cpu = time.perf_counter() - restarted, cpu_seconds([server.pid]) - cpu
    not_back = sum(not (m.back_at and m.back_at > restarted) for m in members)
    generator = (time.process_time() - generator) / seconds * 100
    await asyncio.sleep(5)
    during = sorted(took for m in members for sent, took in zip(m.sent, m.took) if restarted <= sent <= restarted + seconds)
    return {"seconds": seconds, "not_back": not_back,
            "cpu_us": cpu / clients * 1e6, "generator_pct": generator, "p99_ms": 1000 * during[int(len(during) * 0.99)] if during else None,
            "during": len(during), **await finish(server, members, tasks, talkers, stopping, database_url)}


async def finish(server, members: list[Member], tasks, talkers, stopping: asyncio.Event, database_url: str) -> dict:
    """Stop talking, let the last messages arrive, check every member against the stored messages of
    its room, then hang up and stop the server."""
    loop = asyncio.get_running_loop()
    stopping.set()
    talkers.cancel()
    await asyncio.sleep(3)
    stored = await loop.run_in_executor(None, stored_ids, database_url)
    result = {"lost": sum(len(set(stored.get(m.room, [])) - set(m.ids)) for m in members),
              "duplicated": sum(m.duplicated for m in members), "out_of_order": sum(m.out_of_order for m in members)}
    for member in members:
        if member.sock:
            member.sock.transport.abort()
    await asyncio.gather(*tasks, return_exceptions=True)
    server.terminate()
    await loop.run_in_executor(None, server.wait)
    return result


def reconnect_storm(args) -> None:
    """`python chat.py` is restarted under N joined clients (rooms of ten, one talker in each saying a
    message a second) that rejoin with `since` as /test does: the time from SIGTERM until every
    client is back, the p99 of live deliveries meanwhile (to clients back in their room when the
    message was sent: the rest get it replayed), and whether any client missed, repeated or
    reordered a stored message of its room."""
    rounds = []
    for n in range(args.runs):
        with fresh_database(args.database) as database_url:
            rounds.append(uvloop.run(storm_once(database_url, args.reconnect)))
        print(f"  run {n + 1} of {args.runs}: {rounds[-1]}", file=sys.stderr, flush=True)
    header(f"python chat.py restarted under {args.reconnect} joined clients, {database_label(args.database)}, "
           f"{args.runs} run(s), medians (range)")
    for key, label in (("seconds", "s from SIGTERM until all are back"), ("not_back", "not back within 600 s"),
                       ("cpu_us", "server CPU µs per client back"), ("generator_pct", "load generator % of a core"), ("p99_ms", "p99 ms, live deliveries meanwhile"),
                       ("during", "live deliveries meanwhile"), ("lost", "lost"), ("duplicated", "duplicated"),
                       ("out_of_order", "out of order")):
        median, spread = summary([r[key] for r in rounds])
        print(f"  {label:36} {number(median)} ({spread})", flush=True)
    fail_on(rounds, "not_back", "lost", "duplicated", "out_of_order")


def fail_on(rounds: list[dict], *keys: str, clients: int = 0) -> None:
    """Exit 1 naming each run that left clients out or whose `keys` (lost, dropped, ...) are not 0: a
    script running the benchmark learns it from the status, not only from the table."""
    faults = [f"run {n + 1}: only {r['joined']} of {clients} joined" for n, r in enumerate(rounds)
              if r.get("joined", clients) < clients]
    faults += [f"run {n + 1}: {key.replace('_', ' ')} {r[key]}" for n, r in enumerate(rounds) for key in keys if r[key]]
    if faults:
        raise SystemExit("failed: " + "; ".join(faults))


# --- Held for minutes ------------------------------------------------------------------------------


async def hold_once(database_url: str, clients: int, minutes: float) -> dict:
    loop, port = asyncio.get_running_loop(), free_port()
    server = await loop.run_in_executor(None, start_chat, {**os.environ, **BENCH_ENV, "DATABASE_URL": database_url}, port)
    empty, stopping, began = rss_bytes([server.pid]), asyncio.Event(), time.perf_counter()
    members, tasks = await arrive(port, clients, stopping)
    result = {"joined": len(members), "arrived_s": time.perf_counter() - began}
    await asyncio.sleep(3)
    result["kb_each"] = (rss_bytes([server.pid]) - empty) / len(members) / 1024
    talkers = asyncio.create_task(talk(members[::10], stopping, 1.0, turns=20))
    held, generator = time.perf_counter(), time.process_time()
    window = min(60.0, minutes * 60)  # a minute at a time, or all of a shorter hold
    for minute in range(1, math.ceil(minutes * 60 / window) + 1):
        start, cpu = time.perf_counter(), cpu_seconds([server.pid])
        await asyncio.sleep(window)
        took = sorted(t for m in members for sent, t in zip(m.sent, m.took) if start <= sent < start + window)
        result[f"m{minute}_cpu_pct"] = (cpu_seconds([server.pid]) - cpu) / window * 100
        result[f"m{minute}_p50_ms"] = 1000 * took[len(took) // 2] if took else None
        result[f"m{minute}_p99_ms"] = 1000 * took[int(len(took) * 0.99)] if took else None
        result[f"m{minute}_delivered"] = len(took)
    result["kb_each_end"] = (rss_bytes([server.pid]) - empty) / len(members) / 1024
    result["generator_pct"] = (time.process_time() - generator) / (time.perf_counter() - held) * 100
    result["pings_each"] = sum(m.sock.pings for m in members if m.sock) / len(members)
    result["dropped"] = sum(m.dropped for m in members)
    return result | await finish(server, members, tasks, talkers, stopping, database_url)


def hold(args) -> None:
    """N clients join `python chat.py` in rooms of ten and stay for --minutes, the server pinging
    each (PING_INTERVAL) while one client in each room says a message a second (a twentieth of the
    rooms every 50 ms): per minute, the p99 of those deliveries and the server's CPU; memory per
    joined client; what was dropped, lost, repeated or reordered."""
    rounds = []
    for n in range(args.runs):
        with fresh_database(args.database) as database_url:
            rounds.append(uvloop.run(hold_once(database_url, args.hold, args.minutes)))
        print(f"  run {n + 1} of {args.runs}: {rounds[-1]}", file=sys.stderr, flush=True)
    header(f"{args.hold} clients joining python chat.py, held {args.minutes:g} minute(s), "
           f"{database_label(args.database)}, {args.runs} run(s), medians (range)")
    labels = {"joined": "clients joined", "arrived_s": "s until they had joined", "kb_each": "kB server memory each, joined",
              "cpu_pct": "server CPU, % of a core", "p50_ms": "p50 ms, deliveries", "p99_ms": "p99 ms, deliveries",
              "delivered": "deliveries", "kb_each_end": "kB server memory each, at the end",
              "pings_each": "pings answered each, since joining", "dropped": "connections dropped",
              "generator_pct": "load generator, % of a core"}
    for key in rounds[0]:
        minute, _, name = key.partition("_") if key[0] == "m" and key[1].isdigit() else ("", "", key)
        label = (f"minute {minute[1:]}: " if minute else "") + labels.get(name, name.replace("_", " "))
        median, spread = summary([r[key] for r in rounds])
        print(f"  {label:36} {number(median)} ({spread})", flush=True)
    fail_on(rounds, "dropped", "lost", "duplicated", "out_of_order", clients=args.hold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", default=os.environ.get("DATABASE_URL", "").startswith("postgres")
                        and os.environ["DATABASE_URL"] or None,
                        help="a PostgreSQL server URL; a fresh database is made on it "
                             "(default: DATABASE_URL if PostgreSQL, else a temporary SQLite file)")
    parser.add_argument("--workers", type=int, default=1, help="chat.py processes (PostgreSQL only for >1)")
    parser.add_argument("--quick", action="store_true", help="small and short: check that it works")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--url", help="drive a server already running at ws://HOST:PORT/PATH instead")
    mode.add_argument("--compare", metavar="TARGET",
                      help="compare with a folder with setup.sh and run.sh, or a chat.py file")
    mode.add_argument("--reconnect", type=int, metavar="N",
                      help="restart python chat.py under N joined clients that rejoin with since, as /test does")
    mode.add_argument("--hold", type=int, metavar="N",
                      help="N clients joined in rooms of ten stay for --minutes, pinged, one talker a room")
    mode.add_argument("--scaling", nargs="?", const="", metavar="PEER",
                      help="write-heavy on 1, 2, 4 processes (PostgreSQL); with PEER (another chat.py), "
                           "both, alternating")
    parser.add_argument("--pid", type=int, help="with --url: its process, for CPU and memory figures")
    parser.add_argument("--runs", type=int, default=3, help="--compare, --scaling, --reconnect, --hold: runs (default 3)")
    parser.add_argument("--only", default="", help="only these kinds of scenario, comma-separated: "
                                                   "latency, flat, idle, storm, write-heavy (default: all), "
                                                   "and replays (chat only: asked for, never by default)")
    parser.add_argument("--minutes", type=float, default=3, help="--hold: minutes held (default 3)")
    parser.add_argument("--storm", type=int, default=2000, metavar="N", help="clients in the join storm (default 2000)")
    args = parser.parse_args()
    STORM[0] = args.storm
    ONLY.update(kind for kind in args.only.split(",") if kind)
    for wrong, message in ((args.workers > 1 and not args.database, "several workers need PostgreSQL"),
                           (args.scaling is not None and not args.database, "--scaling needs PostgreSQL"),
                           (args.pid and not args.url, "--pid goes with --url"),
                           (args.runs < 1, "--runs must be at least 1")):
        if wrong:
            parser.error(message)
    if args.compare:
        compare(args)
    elif args.reconnect:
        reconnect_storm(args)
    elif args.hold:
        hold(args)
    elif args.scaling is not None:
        scaling(args)
    else:
        single(args)


if __name__ == "__main__":
    main()
