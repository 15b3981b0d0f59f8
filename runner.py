"""runner: serve chat's app with uvicorn, bounded in what a client may take of the server itself.

`python chat.py` serves through this module: the documented way to let others in. Plain
`uvicorn chat:app` serves the same app with uvicorn's defaults, which suit a trusted network.
Seen under attack with those defaults: idle and half-sent requests held for ever (21,000 of them
used up every file descriptor), a 64 MB header answered, a peer that pings and never reads growing
memory by 16 MB/s, a message sent as millions of empty fragments freezing every other client,
compressed frames inflating to 16 MiB each, tokens in the access log, X-Forwarded-For believed
from any local process, and a peer that floods frames after the app closed its socket keeping the
loop busy for the 10 s uvicorn waits for its close.

So this module builds uvicorn's Config itself and installs its bounds through uvicorn's supported
hooks: `Config(http=..., ws=...)` takes the protocol subclasses below, and the other bounds are
Config's own settings. The subclasses use uvicorn's protocol internals, so requirements.txt pins
uvicorn, httptools and websockets, and serve() refuses another uvicorn. The app learns of the
runner the way ASGI means it: two keys in scope["extensions"], "chat.bounded" (lifespan: the
bounds are on, and how many connections each refused, for /metrics) and "chat.write_now"
(WebSocket: write a frame's bytes now, for broadcasts).
"""

import asyncio
import contextlib
import copy
import errno
import functools
import gc
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from urllib.parse import unquote, unquote_plus

try:
    import resource  # file-descriptor limits; Unix only
except ImportError:  # Windows
    resource = None

import asyncpg
import httptools
import psutil
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.supervisors import Multiprocess
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

UVICORN = "0.54."  # the version whose protocol internals the subclasses below are written against

# --- The server's own settings: environment variables (or flags), used under python chat.py only ---


SETTINGS: dict[str, str] = {}  # each server setting, and what python chat.py --help says it does


def setting(name: str, default: str, what: str, kind=str, least: float = -math.inf):
    """An environment variable as `kind`; a bad value, or a number under `least`, stops the start in
    one line that names it (as chat.setting)."""
    SETTINGS[name] = what
    raw = os.environ.get(name) or default
    number = "a whole number" if kind is int else "a number"
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: use {number}, e.g. {name}={default}") from None
    if kind in (int, float) and not least <= value < math.inf:
        raise SystemExit(f"{name}={raw!r}: use {number} of {least:g} or more, e.g. {name}={default}")
    return value


def address() -> tuple[str, int]:
    """HOST and PORT, read again after python chat.py --host and --port have set them."""
    host = setting("HOST", "127.0.0.1", "the address to serve on (--host); 0.0.0.0: every interface, for a class")
    port = setting("PORT", "8000", "the port (--port), 1-65535", int)
    if not 0 < port < 65536:
        raise SystemExit(f"PORT={port}: use a port from 1 to 65535, e.g. PORT=8000")
    return host, port


HOST, PORT = address()
SSL_KEYFILE = setting("SSL_KEYFILE", "", "with SSL_CERTFILE: serve https:// and wss://") or None
SSL_CERTFILE = setting("SSL_CERTFILE", "", "the certificate (chain) for SSL_KEYFILE") or None
if SSL_KEYFILE or SSL_CERTFILE:  # said in one line here, not in a traceback from uvicorn's start
    try:
        if not (SSL_KEYFILE and SSL_CERTFILE):
            raise ValueError("set both, or neither")
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(SSL_CERTFILE, SSL_KEYFILE)
    except (ValueError, OSError) as exc:  # ssl.SSLError is an OSError
        raise SystemExit(f"SSL_KEYFILE={SSL_KEYFILE or ''} SSL_CERTFILE={SSL_CERTFILE or ''}: {exc}; give a key "
                         "and its certificate, both readable PEM files") from None
REQUEST_TIMEOUT = setting("REQUEST_TIMEOUT", "10", "seconds to send a whole request or handshake; then 408", float,
                          0.1)
MAX_HEAD_BYTES = setting("MAX_HEAD_BYTES", "16384", "bytes of request line and headers; more get 431", int, 1024)
MAX_SOCKETS_PER_IP = setting(  # WebSockets, and the HTTP connections of their pages loading
    "MAX_SOCKETS_PER_IP", str(2 * int(os.environ.get("MAX_CONNECTIONS_PER_IP") or 100) + 20),
    "TCP connections of any kind from one address; more get 503", int, 1)
PING_INTERVAL = setting("PING_INTERVAL", "20", "seconds between pings to each socket", float, 0.1)
PING_TIMEOUT = setting("PING_TIMEOUT", "20", "seconds a socket has to answer a ping", float, 0.1)
SHUTDOWN_SECONDS = setting("SHUTDOWN_SECONDS", "10", "on SIGTERM, seconds before connections still open are cut "
                           "(at 0, uvicorn would cut even those closing, saying ERROR)", float, 1)
TRUSTED_PROXIES = setting("TRUSTED_PROXIES", "", "your proxies' addresses or networks: only their "
                          "X-Forwarded-For is believed", lambda v: [p.strip() for p in v.split(",") if p.strip()])
LOG_FORMAT = setting("LOG_FORMAT", "text", "text, or json: one JSON object a line")
if LOG_FORMAT not in ("text", "json"):
    raise SystemExit(f"LOG_FORMAT={LOG_FORMAT!r}: use text or json, e.g. LOG_FORMAT=json")
LOG_LEVEL = setting("LOG_LEVEL", "info", "info: a line for each socket and request; warning: only what "
                    "needs an operator")
if LOG_LEVEL not in ("info", "warning"):
    raise SystemExit(f"LOG_LEVEL={LOG_LEVEL!r}: use info or warning, e.g. LOG_LEVEL=warning")

MAX_HEAD_FIELDS = 100
CLOSE_GRACE = 5.0  # seconds a closing WebSocket has to flush to a peer that does not read
PINGS_PER_SECOND, PINGS_BURST = 1.0, 10.0  # pings and pongs a peer may send (browsers send none)
# A message may come in fragments (browsers send one frame), and websockets counts only their bytes:
# empty continuation frames cost the server work without growing the message, and the app never
# sees them. So fragments are budgeted here, per message and per second.
MAX_FRAGMENTS = 64  # frames one message may come in
FRAGMENTS_PER_SECOND, FRAGMENTS_BURST = 64.0, 256.0
# Once the app has closed a socket, uvicorn reads on for up to 10 s for the peer's close, parsing
# whatever comes: a peer that floods frames then keeps the loop busy. Its close and what was on its
# way fit in this; past it, the connection is dropped.
AFTER_CLOSE_BYTES = 65536
# The kernel's buffer for what a socket sends grows, by itself, up to tcp_wmem's most (4 MB here)
# for a peer that stops reading, outside every limit of ours; fixed at this (Linux keeps twice it),
# such a socket holds 128 kB of the kernel's memory. What does not fit waits in the app's outbox.
SEND_BUFFER_BYTES = 65536
try:
    TRUSTED = [ipaddress.ip_network(proxy, strict=False) for proxy in TRUSTED_PROXIES]
except ValueError as exc:
    raise SystemExit(f"TRUSTED_PROXIES: {exc}; give addresses or networks, e.g. TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8") from None
log = logging.getLogger("uvicorn.error")
# Each socket's own lines from uvicorn ("[accepted]", "403") and websockets ("connection open",
# "closed"): warnings and errors only. The app's lines tell each socket's story already, naming the
# user, the room and the address, and a refusal once a minute however many come.
PEERS = logging.getLogger("uvicorn.error.websockets")
# Every log record is cheaper, as the logging HOWTO's "Optimization" says: no format here shows the
# caller's file and line, the thread or the process, so they are not looked up.
logging._srcfile = None
logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def address_key(ip: str) -> str:
    """What a per-address limit counts: an IPv4 address (::ffff:a.b.c.d too), or an IPv6 /64 (as chat.address_key)."""
    if ":" not in ip:
        return ip
    address = ipaddress.IPv6Address(ip)
    return str(address.ipv4_mapped or ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


def trusted(ip: str) -> bool:
    try:
        return any(ipaddress.ip_address(ip) in network for network in TRUSTED)
    except ValueError:
        return False


def socket_budget() -> int:
    """Sockets this process may hold: its file-descriptor limit (raised to the hard limit, which
    needs no privilege) less a tenth, at least 64, for the database, logs and files."""
    if resource is None:  # Windows has no such limit to run into
        return 20_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    return limit - max(64, limit // 10)


class Bucket:
    """A token bucket: `burst` at once, `rate` a second on average."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.refilled = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# --- HTTP: a deadline for each request, a cap on its head, and on sockets ------------------------


HEAD_TOO_LARGE = f"the request line and headers are over {MAX_HEAD_BYTES} bytes or {MAX_HEAD_FIELDS} fields"
FULL, CROWDED = "the server is full", "too many connections from one address"
PROBES = {b"/livez", b"/readyz", b"/healthz", b"/metrics"}  # answered while full: a monitor sees why
PROBE_ROOM = 16  # sockets past the budget, of the descriptors it keeps back, that may ask for a probe


UNHEARD = logging.Logger("refused", logging.CRITICAL + 1)  # says nothing: not even uvicorn's trace lines


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with: a cap on connections (in all, and per address), a deadline
    to send each request (head and body), and a cap on the request head (bytes and fields)."""

    max_sockets = 1 << 20  # config() sets it from the file-descriptor limit
    upgraded = False  # the WebSocket has taken the connection over
    per_ip: Counter[str] = Counter()  # open TCP connections per address, HTTP and WebSocket
    refusals: Counter[str] = Counter()  # by why, for the app's /metrics (offered in its lifespan extension)

    def connection_made(self, transport):
        super().connection_made(transport)
        self.refused, self.full, self.deadline, self.head_bytes, self.head_size, self.fields = False, False, None, 0, 0, 0
        address = self.client[0] if self.client else ""
        self.ip = address_key(address)
        self.per_ip[self.ip] += 1
        if len(self.connections) > self.max_sockets + PROBE_ROOM:
            self.refuse_full()
        elif self.per_ip[self.ip] > MAX_SOCKETS_PER_IP and not trusted(address):
            log.warning(CROWDED)  # not 429: that invites a retry from the same address
            self.refuse(503, b"Service Unavailable", "too many connections from your address: close some tabs, "
                        f"or ask for more (MAX_SOCKETS_PER_IP={MAX_SOCKETS_PER_IP})", "address")
        else:
            self.full = len(self.connections) > self.max_sockets  # then only a probe is answered (on_url)
            self.deadline = self.loop.call_later(REQUEST_TIMEOUT, self.expired)

    def refuse_full(self):
        log.warning(FULL)
        self.refuse(503, b"Service Unavailable", "the server is full; try again later", "full")

    def connection_lost(self, exc):
        self.cancel_deadline()
        forget(self.ip)
        super().connection_lost(exc)

    def cancel_deadline(self):
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def expired(self):
        self.deadline = None
        if self.flow.read_paused:  # our own back-pressure (pipelining, an unread body): not the client's
            self.deadline = self.loop.call_later(REQUEST_TIMEOUT, self.expired)
        elif self.cycle is not None and self.cycle.response_started and (
                self.cycle.more_body or not self.cycle.response_complete):
            self.transport.close()  # answered without its body read, or the answer is under way: no second one
        else:  # the app, waiting for a body that does not come, gets a disconnect
            self.refuse(408, b"Request Timeout", f"send a whole request within {REQUEST_TIMEOUT:g} s", "timeout")

    def refuse(self, status_code: int, phrase: bytes, detail: str, why: str):
        """Answer, saying why as the app's errors do, and close: nothing more of it is read, and
        nothing more said of it (uvicorn would log the parse this stopped as an invalid request)."""
        self.refused, self.logger = True, UNHEARD
        self.refusals[why] += 1
        self.cancel_deadline()
        body = json.dumps({"detail": detail}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status_code, phrase, len(body), body))
        self.transport.close()

    def data_received(self, data):
        if self.refused:
            return
        self.unparsed = data  # until the parser says where the head ended (handle_websocket_upgrade)
        super().data_received(data)
        self.unparsed = b""
        # httptools gathers a long header line before it calls on_header: count the raw bytes too.
        if self.head_bytes is not None and not self.refused:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.refuse(431, b"Request Header Fields Too Large", HEAD_TOO_LARGE, "head")

    def send_400_response(self, msg):
        if self.refused:  # count() stops the parser by raising, which lands here
            return
        if self.cycle is not None and self.cycle.more_body and self.cycle.response_started:
            self.refused, self.logger = True, UNHEARD  # the body of a request answered already: no second answer
            self.refusals["malformed"] += 1
            self.transport.close()
            return
        self.refuse(400, b"Bad Request", "this is not an HTTP/1.1 request this server can read: check its "
                    "request line and headers", "malformed")

    def on_message_begin(self):
        super().on_message_begin()
        self.head_bytes, self.head_size, self.fields = 0, 0, 0
        if self.deadline is None:
            self.deadline = self.loop.call_later(REQUEST_TIMEOUT, self.expired)

    def on_url(self, url):
        self.count(len(url), 0)
        if self.full and url.split(b"?", 1)[0] not in PROBES:
            self.refuse_full()
            raise Refused
        super().on_url(url)

    def on_header(self, name, value):
        self.count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def count(self, size: int, fields: int):
        self.head_size += size
        self.fields += fields
        if self.head_size > MAX_HEAD_BYTES or self.fields > MAX_HEAD_FIELDS:
            self.refuse(431, b"Request Header Fields Too Large", HEAD_TOO_LARGE, "head")
            raise Refused

    def on_headers_complete(self):
        self.head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self):
        self.cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self):
        if self.upgraded:  # a request pipelined before the upgrade: the connection is the WebSocket's now,
            return  # and uvicorn's keep-alive timer would close it
        super().on_response_complete()

    def handle_websocket_upgrade(self):
        """The WebSocket takes over the connection, and with it what came after the head in the same
        read (a client that sent its first frames at once), which uvicorn would drop: the WebSocket
        reads it once the app has accepted."""
        self.cancel_deadline()
        self.upgraded = True
        upgrade = sys.exc_info()[1]  # uvicorn calls this while it handles httptools' HttpParserUpgrade
        super().handle_websocket_upgrade()
        rest = self.unparsed[upgrade.args[0]:] if isinstance(upgrade, httptools.HttpParserUpgrade) else b""
        if rest:
            self.transport.get_protocol().data_received(rest)


class Refused(Exception):
    """Raised from a parser callback to stop httptools once the refusal (431, 503) is sent."""


def forget(ip: str) -> None:
    BoundedHttpTools.per_ip[ip] -= 1
    if BoundedHttpTools.per_ip[ip] <= 0:
        del BoundedHttpTools.per_ip[ip]


# --- WebSockets: budgets for pings and fragments, closes that complete, fast broadcast writes ---


class ClosingTransport:
    """The transport, except that a peer that stops reading cannot hold a close open for ever
    (uvloop's close() waits, without a timeout, for the write buffer to drain): abort after a grace.
    And each write costs a system call, so when a broadcast puts many frames in a client's outbox,
    the first goes at once and the others of that turn of the event loop follow in one write."""

    def __init__(self, transport, loop):
        self.transport, self.loop = transport, loop
        self.pending: list[bytes] | None = None  # None: nothing written this turn
        self.is_closing = transport.is_closing  # asked for every frame: not through __getattr__

    def __getattr__(self, name):
        return getattr(self.transport, name)

    def write(self, data: bytes) -> None:
        if self.pending is None:
            self.transport.write(data)
            self.pending = []
            self.loop.call_soon(self.flush)
        else:
            self.pending.append(data)

    def flush(self) -> None:
        if self.pending and not self.transport.is_closing():
            self.transport.write(b"".join(self.pending))
        self.pending = None

    def close(self):
        self.flush()
        if not self.transport.is_closing():
            self.loop.call_later(CLOSE_GRACE, self.transport.abort)  # nothing, if it is gone by then
        self.transport.close()


def text_frame(text: str) -> bytes:
    """A text frame as it goes on the wire from a server (RFC 6455 5.2: FIN and opcode 1, the
    length, unmasked; no extension, as none is negotiated): the same bytes for every client, so a
    broadcast builds them once. By hand: websockets' Frame.serialize costs four times as much."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    return (struct.pack("!BBH", 0x81, 126, size) if size < 65536 else struct.pack("!BBQ", 0x81, 127, size)) + payload


class Inbox:
    """What uvicorn's protocol uses of asyncio.Queue (put_nowait) for the frames the app has yet to
    receive (BoundedWebSockets.receive), in a fraction of its memory: a waiting connection holds one list."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items, self.waiter = [], None

    def put_nowait(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Gate:
    """What uvicorn's protocol uses of asyncio.Event (set, clear, wait) for `writable`, without
    the deque that each Event keeps for its waiters."""

    __slots__ = ("open", "waiters")

    def __init__(self):
        self.open, self.waiters = True, []

    def is_set(self) -> bool:
        return self.open

    def set(self) -> None:
        self.open = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters = []

    def clear(self) -> None:
        self.open = False

    async def wait(self) -> None:
        if not self.open:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter


class InJson(ServerProtocol):
    """websockets' handshake, refusing one it cannot accept (a bad key, version or method) in JSON,
    as every refusal here."""

    def reject(self, status, text: str):
        if not text:  # the app refused it before accepting: 403, said in its log
            return super().reject(status, text)
        response = super().reject(status, json.dumps({"detail": text.strip()}))
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response


STOPPING = threading.Event()  # set as the server closes its sockets to shut down: their users are not leaving


class BoundedWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with: budgets for pings and pongs (uvicorn answers every
    ping at once and reads on, so a peer that pings and never reads grows the buffer without bound)
    and for fragments, closes that complete even if the peer never reads, a refused handshake
    answered, 1001 (going away) on shutdown instead of 1012, the per-address count, and the
    "chat.write_now" extension for the app's broadcasts. And a waiting connection keeps less
    than stock uvicorn's: a lighter inbox and write gate, and not the handshake's headers."""

    early = b""  # what the peer sent before the app accepted

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queue, self.writable = Inbox(), Gate()
        self.logger = self.conn.logger = PEERS
        self.conn.__class__ = InJson  # uvicorn makes a ServerProtocol; the class, not an attribute: nothing more kept

    def connection_made(self, transport):
        super().connection_made(transport)
        with contextlib.suppress(OSError, AttributeError):  # not on a socket: nothing to fix
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self.transport = ClosingTransport(transport, self.loop)
        self.pings = Bucket(PINGS_PER_SECOND, PINGS_BURST, self.loop.time())
        self.fragments = Bucket(FRAGMENTS_PER_SECOND, FRAGMENTS_BURST, self.loop.time())
        self.message_fragments = 0  # frames of the message being received
        self.after_close = 0  # bytes received since the app closed the socket

    def run_asgi(self):  # not a coroutine itself: a waiting connection keeps one frame fewer
        self.scope["extensions"]["chat.write_now"] = {"write": self.write_now, "frame": text_frame}
        return super().run_asgi()

    async def receive(self):
        """uvicorn's receive, with the inbox's wait in its own frame rather than one more coroutine's."""
        while not self.queue.items:  # one receiver: the app
            self.queue.waiter = self.loop.create_future()
            await self.queue.waiter
        message = self.queue.items.pop(0)
        if self.read_paused and not self.queue.items:
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message):
        """uvicorn's send, except that a send after uvicorn closed the connection itself is a
        disconnect (Starlette's WebSocketDisconnect), not a RuntimeError: a stalled client's 1013
        waits for room in its buffer, and the ping timeout may close it first with 1011."""
        await self.writable.wait()
        if self.close_sent and self.handshake_complete:
            if message["type"] == "websocket.close":  # closed already (the peer broke a rule): as the app wants
                return
            raise ClientDisconnected()
        await super().send(message)
        if message["type"] == "websocket.accept" and self.response is not None:
            # The handshake's headers (the scope has the request's): websockets' parser would keep them.
            self.request.headers.clear()
            self.request = self.response = None
            if self.early and self.handshake_complete:
                early, self.early = self.early, b""
                self.transport.resume_reading()
                self.data_received(early)

    def write_now(self, frame: bytes) -> bool:
        """Write whole text frames' bytes (text_frame()) now, as uvicorn's send would (websockets
        keeps no state for a data frame it sends), unless that send would wait (the transport's
        buffer is full) or fail (the socket is closing), or the connection has an extension: then
        say False, and the app sends through websocket.send as usual."""
        if (self.close_sent or self.disconnected or not self.writable.is_set()
                or self.conn.state is not State.OPEN or self.conn.extensions or self.transport.is_closing()):
            return False
        self.transport.write(frame)
        return True

    def connection_lost(self, exc):
        forget(address_key(self.client[0]) if self.client else "")
        if self.handshake_complete and self.conn.close_rcvd is None:  # no close frame came (uvicorn says 1005):
            sent = self.conn.close_sent  # the code sent (a cut, a ping timeout), else RFC 6455's 1006
            self.queue.put_nowait({"type": "websocket.disconnect", "code": sent.code if sent else 1006})
        super().connection_lost(exc)

    def data_received(self, data):
        if self.handshake_initiated and not self.handshake_complete:
            # Sent before the app accepted: read once it has (frames before the 101 would be answered
            # before it, and uvicorn's errors expect an open socket); the rest waits in the kernel.
            self.early += data
            self.transport.pause_reading()
            return
        if self.close_timer is not None:  # the app closed it: only the peer's close is awaited
            self.after_close += len(data)
            if self.after_close > AFTER_CLOSE_BYTES:
                self.transport.close()
                return
        super().data_received(data)
        # websockets queues its 4xx for a bad handshake (a header line over 8 KiB, say) but raises
        # no event, so uvicorn would hold the connection without answering: answer, and close.
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def handle_ping(self):
        if not self.close_sent and self.pings.take(self.loop.time()):  # the close frame is the last one
            super().handle_ping()  # writes the pong
        elif not self.close_sent:
            self.cut("too many pings")

    def handle_pong(self, event):
        if self.pings.take(self.loop.time()):
            super().handle_pong(event)
        else:
            self.cut("too many pings")

    def handle_text(self, event):
        self.message_fragments = 0
        if self.fragment_allowed(event):
            super().handle_text(event)

    def handle_bytes(self, event):
        self.message_fragments = 0
        if self.fragment_allowed(event):
            super().handle_bytes(event)

    def handle_cont(self, event):
        if self.fragment_allowed(event):
            super().handle_cont(event)

    def fragment_allowed(self, event) -> bool:
        """A whole message in one frame is the app's to budget; the frames of a fragmented one are ours."""
        if self.close_sent:  # cut: the rest of what was read with it is dropped
            return False
        if event.fin and event.opcode is not Opcode.CONT:
            return True
        self.message_fragments += 1
        if self.message_fragments > MAX_FRAGMENTS:
            self.cut(f"a message in more than {MAX_FRAGMENTS} fragments")
        elif not self.fragments.take(self.loop.time()):
            self.cut("too many fragments a second")
        return not self.close_sent

    def cut(self, reason: str) -> None:
        """Close with 1008 at once, as uvicorn's keepalive_timeout() closes, and read no more."""
        if not self.close_sent:
            self.conn.fail(1008, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()

    def shutdown(self):
        STOPPING.set()
        if not self.handshake_complete or self.close_sent:
            return super().shutdown()
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1001})
        self.conn.send_close(1001, "server shutting down")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()


# --- Logs: a time on every line, no tokens, and a peer's faults said once a minute ---------------


class JsonLines(logging.Formatter):
    """LOG_FORMAT=json: a log collector reads one JSON object a line, no parsing of prose; a request's
    line (uvicorn's access log) and a socket's (joined, left, closed, refused) also have their parts
    as fields, to count by status, path, client or close code."""

    ACCESS = ("client", "method", "path", "http_version", "status")
    FIELDS = ("client", "username", "room", "code", "error")  # chat's lines about sockets (Said's fields)

    def format(self, record):
        line = {"time": self.formatTime(record), "level": record.levelname,
                "logger": record.name.removeprefix("uvicorn.error."), "message": record.getMessage()}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(self.ACCESS):
            line |= zip(self.ACCESS, record.args)
        line |= {field: record.__dict__[field] for field in self.FIELDS if field in record.__dict__}
        return json.dumps(line, ensure_ascii=False)

    def formatTime(self, record, datefmt=None):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def log_config() -> dict:
    """uvicorn's logging, with the time first on every line (or as JSON lines), tokens redacted and
    peers' faults quietened; as a dict, so that worker processes set up the same."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["root"] = {"handlers": ["default"], "level": "WARNING"}  # other libraries' lines, formatted alike
    config["loggers"][PEERS.name] = {"level": "WARNING"}
    config["filters"] = {"redact": {"()": RedactTokens}, "quiet": {"()": QuietPeers}}
    config["handlers"]["default"]["filters"] = ["redact", "quiet"]
    config["handlers"]["access"]["filters"] = ["redact"]
    for formatter in config["formatters"].values():
        if LOG_FORMAT == "json":
            formatter.clear()
            formatter["()"] = JsonLines
        else:
            formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    return config


class RedactTokens(logging.Filter):
    """A `token` in a logged query string (uvicorn's access log, its WebSocket lines) becomes [redacted],
    and so does any run of URL characters that holds one of chat's tokens (a JWT: "eyJ" and at least
    ten more characters, a dot, ten or more, a dot; any of them may be percent-encoded, up to
    DECODINGS times over), as pasted into a path or inside another parameter (?next=%2Fws%3Ftoken%3DeyJ...).
    Both passes are linear: a parameter's name stops at the next "?", a run at the next character outside it."""

    PARAMETER = re.compile(r"([?&])([^=&#?\s\"]*)=([^&#\s\"]*)")
    RUN = re.compile(r"[\w.%~-]+")
    DECODINGS = 8  # a URL in a parameter of a URL in a parameter of ...: each level encodes it once more

    def redact(self, match):
        if unquote_plus(match.group(2)).lower() == "token":
            return f"{match.group(1)}{match.group(2)}=[redacted]"
        return match.group(0)

    @staticmethod
    def tokens(match):
        if len(match.group(0)) < 25:  # shorter than any token: not decoded (16 kB of "=%" would be 8,000 runs)
            return match.group(0)
        run = match.group(0)
        for _ in range(RedactTokens.DECODINGS):
            run, before = unquote(run), run
            if run == before:
                break
        if "eyJ" in run:
            parts = run.split(".")  # a token's header, payload, signature: "monkeyJump.min.js" is none
            for n, part in enumerate(parts[:-2]):
                if "eyJ" in part and len(part) - part.find("eyJ") >= 13 and len(parts[n + 1]) >= 10:
                    return "[redacted]"
        return match.group(0)

    def filter(self, record):
        if isinstance(record.args, tuple) and any(isinstance(a, str) and ("=" in a or "eyJ" in a or "%" in a)
                                                  for a in record.args):
            record.args = tuple(self.RUN.sub(self.tokens, self.PARAMETER.sub(self.redact, a)) if isinstance(a, str)
                                else a for a in record.args)
        return True


class QuietPeers(logging.Filter):
    """A peer's bad frame is the peer's fault, not the server's: uvicorn logs each with a traceback,
    at the peer's pace. One line per kind a minute instead, saying how many more came."""

    KINDS = {"Invalid UTF-8 sequence received from client.": "a peer sent a text frame that is not "
                                                             "UTF-8 (closed with 1007)",
             "Invalid HTTP request received.": "refused a connection with 400: what it sent is not HTTP/1.1 "
                                               "(a scanner, or TLS sent to a plain port)",
             FULL: "refused a connection with 503: the server is full (it holds as many as its file "
                   "descriptors allow: raise ulimit -n)",
             CROWDED: f"refused a connection with 503: its address has MAX_SOCKETS_PER_IP={MAX_SOCKETS_PER_IP} open "
                      "(a class behind one address may need more)"}

    MINUTE = 60.0
    made: list = []  # QuietPeers made by logging's configuration: one a process

    def __init__(self):
        super().__init__()
        self.said: dict[str, float] = {}
        self.unsaid: Counter[str] = Counter()
        self.summaries: dict[str, functools.partial] = {}  # each kind's line to come, saying how many more
        self.made.append(self)

    @classmethod
    def say_held(cls) -> None:
        """At shutdown: the counts the minute holds, said now rather than lost."""
        for quiet in cls.made:
            for summary in list(quiet.summaries.values()):
                summary()

    def filter(self, record):
        if record.msg not in self.KINDS:
            return True
        kind, now, summary = record.msg, time.monotonic(), record.__dict__.get("summary")
        if summary and not self.unsaid[kind]:  # said already, with one that came after the minute
            return False
        if not summary and now - self.said.get(kind, -self.MINUTE) < self.MINUTE:
            self.unsaid[kind] += 1
            if self.unsaid[kind] == 1:  # counted once the minute is over, whether or not another comes
                self.summaries[kind] = functools.partial(logging.getLogger(record.name).warning, kind,
                                                         extra={"summary": True})
                with contextlib.suppress(RuntimeError):  # no loop running: counted with the next one
                    asyncio.get_running_loop().call_later(self.said[kind] + self.MINUTE - now, self.summaries[kind])
            return False
        self.said[kind], more = now, self.unsaid.pop(kind, 0)
        self.summaries.pop(kind, None)
        record.msg = self.KINDS[kind] + (f": {more} more in the last minute" if summary else
                                         f"; {more} more in the last minute" if more else "")
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
        return True


# --- The server ------------------------------------------------------------------------------------


class Bounded:
    """The app, told through its lifespan scope that the server's bounds are on, and when the
    server begins to shut down (chat.bounded's "stopping"); and given its database, opened before
    the server started (its "opened")."""

    def __init__(self, app):
        self.app, self.opened = app, None

    def __call__(self, scope, receive, send):  # not a coroutine: no frame kept for each connection
        if scope["type"] == "lifespan":
            bounded = {"refusals": BoundedHttpTools.refusals, "stopping": STOPPING, "settings": list(SETTINGS),
                       "opened": self.opened}
            self.opened = None  # taken once
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "chat.bounded": bounded}}
            return self.app(scope, receive, functools.partial(self.lifespan_send, send))
        return self.app(scope, receive, send)

    @staticmethod
    async def lifespan_send(send, message):
        if message["type"] == "lifespan.shutdown.complete":  # every connection is gone by now
            QuietPeers.say_held()
        await send(message)


class Supervisor(Multiprocess):
    """uvicorn's, but for SIGHUP (a closed terminal): every worker stops as for Ctrl+C, storing what
    it accepted, where uvicorn would start them again."""

    def handle_hup(self) -> None:
        self.handle_term()


def bounded_chat():
    """What each worker process serves (python chat.py --workers N): chat's app, bounded."""
    import chat

    if hasattr(signal, "SIGHUP"):  # a closed terminal tells every process: the supervisor stops them in turn
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    BoundedHttpTools.max_sockets = socket_budget()
    collect_less()
    return Bounded(chat.app)


def collect_less() -> None:
    """Python's cycle collector scans every object it tracks, and a server holding thousands of
    connections holds millions: what exists at start is frozen out of its scans, and it runs when
    10,000 objects have been made instead of 700 (opening 10,000 joined sockets: 3.7 s of it, 1.4 s)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def config(app, max_frame_bytes: int, **settings) -> uvicorn.Config:
    """uvicorn's Config for the app with every bound on (settings: host, port, log_level, workers,
    ...); with workers, `app` is "runner:bounded_chat"."""
    BoundedHttpTools.max_sockets = socket_budget()
    settings = {"host": HOST, "port": PORT, "ssl_keyfile": SSL_KEYFILE, "ssl_certfile": SSL_CERTFILE,
                "log_level": LOG_LEVEL, **settings}
    return uvicorn.Config(
        app if isinstance(app, str) else Bounded(app), http=BoundedHttpTools, ws=BoundedWebSockets,
        lifespan="on", interface="asgi3", factory=isinstance(app, str),
        ws_max_size=4 * max_frame_bytes,  # the app answers frame_too_large below that
        ws_per_message_deflate=False,  # no inflating bombs; a chat line needs no compression
        ws_ping_interval=PING_INTERVAL, ws_ping_timeout=PING_TIMEOUT,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS, log_config=log_config(),
        proxy_headers=bool(TRUSTED_PROXIES), forwarded_allow_ips=TRUSTED_PROXIES or None, **settings)


def serve(chat, workers: int = 1) -> None:
    """Serve the app until Ctrl+C or SIGTERM, or say in one line why it cannot be served. Worker
    processes share one directory of metrics (prometheus-client's multiprocess mode), so that a
    scrape of any of them counts them all."""
    if not uvicorn.__version__.startswith(UVICORN):
        raise SystemExit(f"uvicorn {uvicorn.__version__} is installed, but python chat.py's bounds are written "
                         f"for {UVICORN}x: pip install -r requirements.txt (or serve with plain uvicorn chat:app, "
                         "without those bounds)")
    in_use(HOST, PORT)
    built = config(chat.app if workers == 1 else "runner:bounded_chat", chat.MAX_FRAME_BYTES, workers=workers)
    bounded = built.app if workers == 1 else None
    with asyncio.Runner(loop_factory=built.get_loop_factory()) as loop:  # uvloop's, as uvicorn.run() makes it
        try:
            refusal = interruptible(loop, reached(chat, bounded))
            if refusal:  # said here in one line, not between uvicorn's start and stop lines (by each worker)
                log.error("%s", refusal)
                raise SystemExit(3)
            threading.Thread(target=say_where_to_open, args=(bool(chat.SECRET),), daemon=True).start()
            if workers == 1:
                collect_less()
                server = uvicorn.Server(built)
                if hasattr(signal, "SIGHUP"):  # its terminal closed: it stops as for Ctrl+C, storing what it accepted
                    signal.signal(signal.SIGHUP, server.handle_exit)
                with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn raises it again once shut down
                    loop.run(server.serve())  # on the loop the database was opened on
                if not server.started:  # the app refused to start: it has said why
                    raise SystemExit(3)
                return
        except KeyboardInterrupt:  # Ctrl+C before it serves (waiting for the database, say)
            raise SystemExit(1) from None
        finally:
            if bounded and bounded.opened:  # opened for the app, which never took it: its thread would hold the exit
                loop.run(let_go(chat.app.state.database, bounded.opened[0]))
    with tempfile.TemporaryDirectory(prefix="chat-metrics-") as shared:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", shared)  # before the workers import chat
        supervisor = Supervisor(built, sockets=[built.bind_socket()])
        with contextlib.suppress(KeyboardInterrupt):
            supervisor.run()
    if any(process.exitcode == uvicorn.config.STARTUP_FAILURE for process in supervisor.processes):
        raise SystemExit(3)  # a worker refused to start: it has said why


def interruptible(runner: asyncio.Runner, coroutine):
    """Its result; Ctrl+C cancels it and raises KeyboardInterrupt. (asyncio.Runner.run's own handler,
    on a Ctrl+C just as the coroutine ends, raises it inside the running loop, which cannot then
    run again to let the database go.)"""
    loop = runner.get_loop()
    task, interrupted = loop.create_task(coroutine), []
    previous = signal.signal(signal.SIGINT, lambda *_: (interrupted.append(1), loop.call_soon_threadsafe(task.cancel)))
    try:
        result = loop.run_until_complete(task)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return result


async def reached(chat, bounded: Bounded | None) -> str | None:
    """Why the database refuses to be served, or None: opened once (an old one upgraded). The app
    serving on this loop takes it as it is, through `bounded` (no second open, which could find
    the disk full with the first's tables, or the file locked by another process in between);
    else, it is let go."""
    database = chat.app.state.database if bounded else chat.open_database(chat.DATABASE_URL)
    try:
        opened = await chat.opened(database)
    except chat.Refusal as exc:
        return str(exc)
    if bounded:
        bounded.opened = opened
        return None
    await let_go(database, opened[0])


async def let_go(database, lock) -> None:
    await database.disconnect()
    if lock:
        lock.close()


def loopback(host: str) -> bool:
    """Whether --host reaches this machine alone: a loopback address, or localhost (--host takes a name too)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def say_where_to_open(secret: bool) -> None:
    """Once the chat listens (not before: it may never start), the URLs to open, on every
    interface when it serves on all of them (uvicorn listens once the app has started); with a
    secret, those alone let nobody in."""
    local = HOST if HOST not in ("0.0.0.0", "::", "") else "127.0.0.1"
    while True:
        try:
            socket.create_connection((local, PORT), timeout=2).close()
            break
        except OSError:
            time.sleep(0.1)
    hosts = [HOST] if HOST not in ("0.0.0.0", "::", "") else sorted(
        {address.address for addresses in psutil.net_if_addrs().values() for address in addresses
         if address.family == socket.AF_INET})
    page = {host: f"{'https' if SSL_CERTFILE else 'http'}://{f'[{host}]' if ':' in host else host}:{PORT}/test"
            for host in hosts}
    for host in hosts:  # a class opens those that are not loopback
        log.info("open %s%s", page[host], " (on this machine only)" if len(hosts) > 1 and loopback(host) else "")
    if others := [host for host in hosts if not loopback(host)]:
        log.info("a class in a room of its own opens %s?room=kelas-7a (a room: a-z, 0-9, - and _)", page[others[0]])
    if secret:
        log.info("with CHAT_SECRET set, each person opens a link of their own: python chat.py token --link URL - "
                 "< names.txt prints them (URL: the address above that they reach, or your proxy's)")


def in_use(host: str, port: int) -> None:
    """Say in one line, before anything else, that another program holds the port (uvicorn would
    say it only after the app had started, with no way out), and which one near it is free."""
    if (exc := unbound(host, port)) is None:
        return
    if exc.errno != errno.EADDRINUSE:
        raise SystemExit(f"HOST={host}: cannot serve on it ({exc.strerror}); use one of this machine's "
                         "addresses, or 0.0.0.0 for all of them")
    near = [*range(port + 1, min(port + 100, 65536)), *range(port - 1, max(port - 100, 1023), -1)]
    free = next((f", e.g. python chat.py --port {other}" for other in near if unbound(host, other) is None), "")
    raise SystemExit(f"port {port} is in use on {host} (another chat, or another program): stop it, "
                     f"or choose another port{free}")


def unbound(host: str, port: int) -> OSError | None:
    """Why the port cannot be bound on the host, as uvicorn binds it; None if it can."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


# --- The command line: python chat.py [COMMAND] ------------------------------------------------------


def usage(chat) -> str:
    """What --help prints: the commands, and every setting with the value it has now."""
    values = {**{name: getattr(chat, name, None) for name in chat.SETTINGS}, **{name: globals()[name] for name in SETTINGS}}
    values.update({"CHAT_SECRET": "(set)" if chat.SECRET else "(not set)",
                   "METRICS_TOKEN": "(set)" if chat.METRICS_TOKEN else "(not set)",
                   "ALLOWED_HOSTS": [*chat.ALLOWED_HOSTS, *chat.local_hosts()],
                   "DATABASE_URL": chat.shown_url(chat.DATABASE_URL), "PUBLIC_READS": "1" if chat.PUBLIC_READS else "0"})
    shown = {name: ",".join(v) if isinstance(v, list) else v for name, v in values.items()}
    shown = {name: f"{'(empty)' if value in ('', None) else value}{'' if name in os.environ else ' (default)'}"
             for name, value in shown.items()}
    lines = [f"  {name:24} {shown[name]:26} {what}" for name, what in {**chat.SETTINGS, **SETTINGS}.items()]
    return "\n".join([
        "usage: python chat.py [--host HOST] [--port PORT] [--workers N]   serve the chat (Ctrl+C stops it)",
        "                                   (several workers need PostgreSQL)",
        "       python chat.py token NAME   print a token for NAME (needs CHAT_SECRET); for several, NAME<TAB>TOKEN",
        "                                   a line (token - reads the names from stdin, one a line; token --link",
        "                                   http://HOST:PORT ... prints the page to open instead of the token)",
        "       python chat.py backup FILE  copy the SQLite database to FILE, while it serves",
        "       python chat.py rename-user OLD NEW, delete-user NAME (and their messages), delete-message ID,",
        "       python chat.py prune DAYS KEEP   delete messages older than DAYS and all but the KEEP newest",
        "                                   of each room (0: no such limit); beside a running server too",
        "       python chat.py --help       this text",
        "",
        "Settings are environment variables (README.md, Configuration, says more): name, value now, what it does",
        *lines])


def tokens(chat, names: list[str], link: str | None = None) -> str | None:
    """python chat.py token [--link URL] NAME...: a token for each name (for a class, NAME<TAB>TOKEN a
    line), or with --link the page each student opens (in a room: URL/test?room=ROOM); all or none,
    so that a class is never handed half a list, or two names a reader cannot tell apart."""
    names = [name for name in names if name.strip()]
    if not names:
        return "usage: python chat.py token [--link URL] NAME [NAME...], or token - to read one name a line from stdin"
    address = link and re.fullmatch(r"(https?://[^/?#\s]+)/?(test)?(\?room=([^&#]*))?", link)
    if link is not None and not address:
        return (f"--link {link[:100]}: give the address the server printed at start, e.g. --link "
                "http://192.168.1.5:8000, or its page for a room: --link http://192.168.1.5:8000/test?room=kelas-7a")
    try:
        room = address and address.group(3) and chat.check_room(unquote(address.group(4)))
    except chat.Invalid as exc:
        return f"--link {link[:100]}: {exc}"
    if not chat.SECRET:
        return ("tokens are signed with CHAT_SECRET, which is not set. Set it (to the same value for the server), "
                "e.g.: export CHAT_SECRET=$(python -c \"import secrets; print(secrets.token_hex(32))\")")
    try:
        chat.check_secret()
    except chat.Refusal as exc:
        return str(exc)
    canonical, problems, held = [], [], {}  # problems: (name, what is wrong); held: each look -> its name
    for name in names:
        try:
            if "\t" in name:
                raise chat.Invalid("invalid_username", "it has a tab: one name a line, and nothing else on it")
            canonical.append(chat.check_username(name))
        except chat.Invalid as exc:
            problems.append((name, str(exc)))
            continue
        looks = set(chat.looks(canonical[-1]).values())
        if other := next((held[look] for look in looks if look in held), None):
            problems.append((name, f"looks like {other!r}, also on the list: two people cannot have names that look "
                                   "alike; tell them apart (a surname, an initial)"))
        held.update(dict.fromkeys(looks, canonical[-1]))
    if not problems:
        try:
            problems = [(name, f"looks like the existing user {holder!r}: a token for it could never join; if that is "
                               f"them, make it for {holder!r}, else tell them apart")
                        for name, holder in asyncio.run(holders(chat, canonical)).items()]
        except chat.DATABASE_ERRORS as exc:
            print(f"(the names were not checked against the database: {exc})", file=sys.stderr)
    if problems:
        if len(names) == 1:
            return problems[0][1]
        return "\n".join([f"{name[:100]!r}: {why}" for name, why in problems] + ["no token was printed"])
    shown = [(name, chat.make_token(name)) for name in canonical]
    if link is not None:  # a fragment: the browser never sends it, so no log on the way has it
        shown = [(name, f"{address.group(1)}/test#token={token}{f'&room={room}' if room else ''}") for name, token in shown]
    print("\n".join([token for _, token in shown] if len(names) == 1 else [f"{name}\t{token}" for name, token in shown]))
    return None


async def holders(chat, names: list[str]) -> dict[str, str]:
    """The stored users that these names look like (but themselves), in the database DATABASE_URL
    names; none where there is no database yet."""
    database = chat.open_database(chat.DATABASE_URL)
    if database.url.dialect == "sqlite" and not os.path.isfile(database.url.database):
        return {}
    await database.connect()
    try:
        held = {}
        for name in names:
            for look in set(chat.looks(name).values()):
                if (holder := await database.fetch_val(chat.LOOK_HOLDER, {"look": look})) not in (None, name):
                    held[name] = holder
        return held
    finally:
        await database.disconnect()


def no_database(path: str) -> str:
    return (f"there is no database at {os.path.abspath(path)}: run the command where the server runs, "
            "or set DATABASE_URL as it has it")


def backup(chat, target: str) -> str | None:
    """SQLite's online backup: a consistent copy while the server writes (its lock is flock, which
    SQLite's own locks never meet). The copy gets an identity of its own, so that clients of a server
    restored from it start over: ids after the backup's last one will be given again."""
    url = chat.open_database(chat.DATABASE_URL).url
    if url.dialect != "sqlite":
        return "PostgreSQL is backed up with pg_dump and pg_restore: see README.md, Running it for others"
    if not os.path.isfile(url.database):
        return no_database(url.database)
    if not target.strip():
        return "name the file to copy to, e.g. python chat.py backup chat-copy.db"
    if os.path.exists(target):
        return f"{target} exists: name a new file (a backup never overwrites one)"
    if not os.path.isdir(folder := os.path.dirname(os.path.abspath(target))):
        return f"there is no folder {folder}: make it first (mkdir -p {folder}), or name a file in another"
    with contextlib.closing(sqlite3.connect(f"file:{url.database}?mode=ro", uri=True)) as source:
        if not source.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone():
            return f"{url.database} is not chat's database (no messages table): check DATABASE_URL"
    try:
        with contextlib.closing(sqlite3.connect(url.database, timeout=30)) as source, \
             contextlib.closing(sqlite3.connect(target)) as copied:
            source.backup(copied)
            if copied.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():  # else made at start
                copied.execute(chat.RENEW_IDENTITY, {"identity": uuid.uuid4().hex})
            copied.commit()
    except sqlite3.Error as exc:
        return f"the backup failed ({exc}): check the file and the disk, then try again"
    print(f"copied {url.database} to {target}; to restore, stop the server and put it in the database's place")


async def moderate(chat, command: str, *args: str) -> str:
    """One moderation command on the database DATABASE_URL names, beside a running server; what it did."""
    database = chat.open_database(chat.DATABASE_URL)
    if database.url.dialect == "sqlite" and not os.path.isfile(database.url.database):
        raise chat.Invalid("no_database", no_database(database.url.database))
    await database.connect()
    try:
        if command in ("rename-user", "delete-user"):  # "Siti  Rahma " pasted from a list is the stored "Siti Rahma"
            args = (await as_stored(chat, database, args[0]), *args[1:])
        if command == "rename-user":
            old, new = args
            new = chat.check_username(new)
            if await database.fetch_one(chat.FIND_USER, {"username": new}):
                raise chat.Invalid("taken", f"{new!r} is another user's name: choose another")
            # "Bella" may become "bella"
            await chat.check_lookalike(database, new, former=old, advice="choose another new name")
            try:  # the tokens of both names are taken back in the same step: none made before speaks as NEW
                async with database.transaction():
                    if not await database.fetch_val(chat.RENAME_USER, {"old": old, "new": new}):
                        raise LookupError
                    for name in (old, new):
                        await database.execute(chat.REVOKE, {"username": name, "before": time.time()})
            except (sqlite3.IntegrityError, asyncpg.UniqueViolationError):  # NEW joined since it was looked for
                raise chat.Invalid("taken", f"{new!r} is another user's name: choose another") from None
            except LookupError:
                await database.execute(chat.RELEASE_LOOKS, {"username": new})
                raise chat.Invalid("no_user", await no_user(chat, database, old)) from None
            for look in set(chat.looks(new).values()) & set(chat.looks(old).values()):
                await database.execute(chat.HAND_OVER_LOOK, {"look": look, "old": old, "new": new})
            await database.execute(chat.RELEASE_LOOKS, {"username": old})  # the rest of the old name is free
            await database.execute(chat.CHANGE_USERS, {"mark": json.dumps({"closing": [], "at": uuid.uuid4().hex,
                                                                            "what": f"renamed {old!r} to {new!r}"})})
            return f"renamed {old!r} to {new!r}; their sockets are closed, saying so" + (
                f", and their tokens no longer work: give them one for {new!r}" if chat.SECRET else "")
        if command == "delete-user":
            user_id = await database.fetch_val(chat.FIND_USER, {"username": args[0]})
            if user_id is None:
                raise chat.Invalid("no_user", await no_user(chat, database, args[0]))
            # Their tokens are taken back and their sockets closed first (within a second): they stop sending.
            await database.execute(chat.REVOKE, {"username": args[0], "before": time.time()})
            await database.execute(chat.CHANGE_USERS, {"mark": json.dumps({"closing": [user_id], "at": uuid.uuid4().hex,
                                                                            "what": f"deleted the user {args[0]!r}"})})
            deleted = 0
            while True:  # in batches, so that the server's writes go in between
                if await database.fetch_val(chat.USER_BY_ID, {"id": user_id}) is None:  # deleted meanwhile
                    raise chat.Invalid("no_user", f"{args[0]!r} was deleted meanwhile (by another delete-user, or "
                                                  f"retention), with {deleted} of their messages deleted here")
                while batch := await chat.delete_messages(database, chat.DELETE_USERS_MESSAGES,
                                                          {"user_id": user_id, "batch": chat.PRUNE_BATCH}):
                    deleted += batch
                    await asyncio.sleep(0.05)
                try:
                    if gone := await database.fetch_val(chat.DELETE_SILENT_USER, {"id": user_id}):
                        break
                except (sqlite3.IntegrityError, asyncpg.ForeignKeyViolationError):  # one stored meanwhile
                    pass
                await asyncio.sleep(0.05)
            await database.execute(chat.RELEASE_LOOKS, {"username": gone})  # renamed meanwhile: its name now
            return f"deleted the user {args[0]!r} and their {deleted} message{'' if deleted == 1 else 's'}" + (
                "; their tokens no longer work (a new one would let them back)" if chat.SECRET
                else "; without CHAT_SECRET, anyone may join again under any name, theirs too")
        if command == "delete-message":
            number = int(args[0]) if args[0].isascii() and args[0].isdigit() else args[0]
            if not await chat.delete_messages(database, chat.DELETE_MESSAGE, {"id": chat.check_id(number, "id")}):
                raise chat.Invalid("no_message", f"there is no message {args[0]}")
            return f"deleted the message {args[0]}"
        try:
            days, keep = float(args[0]), int(args[1])
        except ValueError:
            raise chat.Invalid("bad_prune", "DAYS and KEEP are numbers, e.g. python chat.py prune 30 1000") from None
        if not (0 <= days <= 36500 and 0 <= keep <= chat.MOST_KEPT):  # nan is neither
            raise chat.Invalid("bad_prune", f"DAYS is from 0 to 36500 (a hundred years), KEEP from 0 to {chat.MOST_KEPT}")
        return f"deleted {await chat.prune(database, days, keep, pause=0.05)} messages"
    finally:
        await database.disconnect()


async def as_stored(chat, database, name: str) -> str:
    """The name as stored: as written if a user has it (an earlier version's looser names), else its
    canonical form, if it has one."""
    if await database.fetch_one(chat.FIND_USER, {"username": name}) is None:
        with contextlib.suppress(chat.Invalid):
            return chat.check_username(name)
    return name


async def no_user(chat, database, name: str) -> str:
    """There is no such user: but perhaps one that looks like it, whose name can be copied from here."""
    holders = {row["username"] for look in set(chat.looks(name).values())
               for row in await database.fetch_all(chat.LOOK_HOLDER, {"look": look})}
    return f"there is no user {name!r}" + "".join(f"; {holder!r} looks like it{chat.unlike(name, holder)}"
                                                  for holder in sorted(holders)[:3])


EXAMPLES = {"--host": "0.0.0.0", "--port": "8000", "--workers": "2"}
MODERATION = {"rename-user": "OLD NEW", "delete-user": "NAME", "delete-message": "ID", "prune": "DAYS KEEP"}


def main(chat, argv: list[str]) -> None:
    """python chat.py [COMMAND]: serve the chat bounded, or run one command."""
    global HOST, PORT
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(usage(chat))
        return
    if argv[:1] == ["token"]:
        link = argv[2] if argv[1:2] == ["--link"] and len(argv) > 2 else None
        names = argv[1 + 2 * (link is not None):]
        names = names if names != ["-"] else sys.stdin.read().lstrip("\ufeff").replace("\r\n", "\n").split("\n")
        if any(name.startswith("-") and name != "-" for name in names):  # token -h, token alice --link URL
            names = []  # tokens() says how it is used
        return sys.exit(tokens(chat, names, link))
    if argv[:1] and argv[0] in MODERATION:
        if len(argv) != 1 + len(MODERATION[argv[0]].split()):
            sys.exit(f"usage: python chat.py {argv[0]} {MODERATION[argv[0]]}")
        try:
            return print(asyncio.run(moderate(chat, *argv)))
        except chat.Invalid as exc:
            sys.exit(str(exc))
        except chat.DATABASE_ERRORS as exc:  # e.g. a database chat never served: no tables
            sys.exit(f"the database at {chat.shown_url(chat.DATABASE_URL)} failed ({exc}): check DATABASE_URL, "
                     "and that python chat.py has served it once")
    if argv[:1] == ["backup"]:
        return sys.exit(backup(chat, *argv[1:]) if len(argv) == 2 else "usage: python chat.py backup FILE")
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--") else [arg])]  # --port=3000
    flags = dict(zip(argv[::2], argv[1::2]))  # --host 0.0.0.0 --port 3000: as HOST and PORT
    if not set(argv[::2]) <= {"--host", "--port", "--workers"}:
        sys.exit(f"unknown arguments: {' '.join(argv)}; python chat.py --help lists what it takes")
    if len(argv) % 2:
        sys.exit(f"{argv[-1]} needs a value, e.g. {argv[-1]} {EXAMPLES[argv[-1]]}")
    if not flags.get("--port", "1").isdigit() or not 0 < int(flags.get("--port", "1")) < 65536:
        sys.exit(f"--port {flags['--port']}: use a port from 1 to 65535, e.g. --port 8000")
    workers = flags.pop("--workers", "1")
    if not workers.isdigit() or int(workers) < 1:
        sys.exit(f"--workers {workers}: use a whole number of processes, e.g. --workers 2")
    if int(workers) > 1 and chat.app.state.database.url.dialect == "sqlite":
        sys.exit(f"--workers {workers}: SQLite serves one process; for several, use PostgreSQL "
                 "(DATABASE_URL=postgresql://...)")
    os.environ.update({flag[2:].upper(): value for flag, value in flags.items()})  # for workers, too
    HOST, PORT = address()
    serve(chat, int(workers))
