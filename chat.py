"""chat: a real-time chat server in one module (Starlette, WebSockets, raw SQL on SQLite or PostgreSQL).

Run it:   pip install -r requirements.txt && python chat.py     (or: uvicorn chat:app)
Then open http://127.0.0.1:8000/test, or: websocat ws://127.0.0.1:8000/ws

Reading order: configuration; database; validation; security checks (tokens, origins); the hub
(who is connected where, and the broadcast); the message writer (persistence, delivery in id
order); several processes (PostgreSQL LISTEN/NOTIFY, shared presence); HTTP handlers; the
WebSocket handler (the handshake checks, then one frame at a time); OpenAPI; lifespan, routes, app;
the runner (python chat.py, python chat.py token NAME).
"""

import asyncio
import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import re
import sqlite3
import sys
import time
import uuid
from collections import Counter, deque
from urllib.parse import urlsplit

import asyncpg
import jwt
import swagger_ui_bundle
import uvicorn
from databases import Database
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

# --- Configuration: environment variables, each with a default that works offline -------------

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///chat.db")
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8000"))
# Browser origins allowed besides the server's own, for REST (CORS) and WebSocket handshakes; "*" = any.
ALLOWED_ORIGINS = [o for o in os.environ.get("ALLOWED_ORIGINS", "").split(",") if o]
SECRET = os.environ.get("CHAT_SECRET", "")  # set it to require signed tokens (python chat.py token NAME)
TOKEN_TTL_SECONDS = int(os.environ.get("TOKEN_TTL_SECONDS", "86400"))
MAX_CONNECTIONS = int(os.environ.get("MAX_CONNECTIONS", "10000"))
MAX_CONNECTIONS_PER_IP = int(os.environ.get("MAX_CONNECTIONS_PER_IP", "20"))
RATE_PER_SECOND = float(os.environ.get("RATE_PER_SECOND", "5"))  # frames per connection, on average
RATE_BURST = float(os.environ.get("RATE_BURST", "10"))  # frames a connection may send at once
FLOOD_LIMIT = int(os.environ.get("FLOOD_LIMIT", "50"))  # refused frames in a row before we hang up
MAX_CONTENT_LENGTH = int(os.environ.get("MAX_CONTENT_LENGTH", "2000"))  # schema.sql CHECKs 2000 too
MAX_FRAME_BYTES = int(os.environ.get("MAX_FRAME_BYTES", "16384"))
SEND_QUEUE_FRAMES = int(os.environ.get("SEND_QUEUE_FRAMES", "1000"))
PING_INTERVAL = float(os.environ.get("PING_INTERVAL", "20"))  # a dead peer is dropped within
PING_TIMEOUT = float(os.environ.get("PING_TIMEOUT", "20"))  # PING_INTERVAL + PING_TIMEOUT seconds
PRESENCE_TIMEOUT = float(os.environ.get("PRESENCE_TIMEOUT", "15"))  # PostgreSQL: a silent process's
                                                                     # users count as gone after this
SHUTDOWN_SECONDS = float(os.environ.get("SHUTDOWN_SECONDS", "10"))  # then stuck connections are cut
TRUSTED_PROXIES = os.environ.get("TRUSTED_PROXIES", "")  # addresses whose X-Forwarded-For is believed
HISTORY_ON_JOIN = 10
REPLAY_LIMIT = 500  # most messages replayed after a reconnect; older ones are left to GET /messages
MAX_USERNAME_LENGTH = 32
DEFAULT_ROOM = "general"

HERE = pathlib.Path(__file__).parent
log = logging.getLogger("chat")

# --- Database -----------------------------------------------------------------------------------

class Unavailable(Exception):
    """The database failed while a message waited to be stored: it was not stored."""


# What a failing database raises; callers turn these into an "unavailable" error, never a 500.
# (asyncpg raises InternalClientError when a connection is terminated mid-operation.)
DATABASE_ERRORS = (OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError,
                   asyncpg.InternalClientError, Unavailable)


class SQLiteConnection(sqlite3.Connection):
    """Every SQLite connection enforces foreign keys and waits for a lock instead of failing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA foreign_keys = ON")
        self.execute("PRAGMA busy_timeout = 30000")
        self.execute("PRAGMA journal_mode = WAL")
        self.execute("PRAGMA synchronous = NORMAL")


def open_database(url: str) -> Database:
    """SQLite needs the connection class above; PostgreSQL a fixed-size pool."""
    if url.startswith("sqlite"):
        return Database(url, factory=SQLiteConnection, timeout=30)
    return Database(url, min_size=5, max_size=10, command_timeout=10)


async def apply_schema(database: Database) -> None:
    """Create the tables if they are missing; safe to run at every start."""
    schema = (HERE / "schema.sql").read_text()
    async with database.connection() as connection:
        raw = connection.raw_connection
        if database.url.dialect == "sqlite":
            await raw.executescript(schema)
        else:
            # The lock keeps two processes starting at once from racing on CREATE TABLE.
            async with raw.transaction():
                await raw.execute("SELECT pg_advisory_xact_lock(7450)")
                await raw.execute(schema.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"))


def lock_sqlite_file(database: Database):
    """SQLite serves one process: a second one on the same file would split the chat, so it refuses."""
    path = database.url.database
    lock = open(f"{path}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"another chat process is serving {path}; SQLite serves one process. "
                           "To run several, use PostgreSQL: DATABASE_URL=postgresql://...") from None
    return lock


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(value) -> str:
    """One timestamp shape on both backends: 2026-11-25T10:00:00.123Z."""
    if isinstance(value, str):  # SQLite hands back text
        value = datetime.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    value = value.astimezone(datetime.timezone.utc)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


def message_out(row) -> dict:
    return {"id": row["id"], "room": row["room"], "username": row["username"],
            "content": row["content"], "timestamp": iso(row["created_at"])}


UPSERT_USER = """
    INSERT INTO users (username, last_seen) VALUES (:username, :now)
    ON CONFLICT (username) DO UPDATE SET last_seen = excluded.last_seen RETURNING id"""
CREATE_USER = """
    INSERT INTO users (username, last_seen) VALUES (:username, :now)
    ON CONFLICT (username) DO NOTHING RETURNING id, username, last_seen"""
FIND_USER = "SELECT id, username, last_seen FROM users WHERE username = :username"
# A whole batch is one statement, its rows one JSON array: one round trip however many messages
# wait, and no transaction left half-open if the connection dies mid-batch. The SQLite and the
# PostgreSQL forms differ in their JSON functions; on PostgreSQL the same statement takes the
# lock that keeps ids committing in order across processes, and wakes the other processes.
INSERT_MESSAGES = {
    "sqlite": """
        INSERT INTO messages (room, user_id, content, created_at)
        SELECT json_extract(value, '$.room'), json_extract(value, '$.user_id'),
               json_extract(value, '$.content'), :now
        FROM json_each(:batch) ORDER BY key
        RETURNING id""",
    "postgresql": """
        WITH locked AS (SELECT pg_advisory_xact_lock(:lock)),
        stored AS (
            INSERT INTO messages (room, user_id, content, created_at)
            SELECT b.room, b.user_id, b.content, :now
            FROM locked, ROWS FROM (json_to_recordset(CAST(:batch AS JSON))
                                    AS (room TEXT, user_id BIGINT, content TEXT))
                         WITH ORDINALITY AS b(room, user_id, content, n)
            ORDER BY b.n
            RETURNING id),
        notified AS (SELECT pg_notify('chat_messages', CAST(MAX(id) AS TEXT)) FROM stored)
        SELECT id FROM stored, notified""",
}
TOUCH_USERS = {
    "sqlite": "UPDATE users SET last_seen = :now WHERE username IN (SELECT value FROM json_each(:usernames))",
    "postgresql": """UPDATE users SET last_seen = :now
                     WHERE username IN (SELECT json_array_elements_text(CAST(:usernames AS JSON)))""",
}
MESSAGES_LOCK = 7451  # PostgreSQL advisory lock: one process at a time assigns message ids
SELECT_MESSAGES = """
    SELECT m.id, m.room, u.username, m.content, m.created_at
    FROM messages AS m JOIN users AS u ON u.id = m.user_id"""
RECENT_MESSAGES = SELECT_MESSAGES + """
    WHERE m.room = :room AND m.id < :before ORDER BY m.id DESC LIMIT :limit"""
MESSAGES_AFTER = SELECT_MESSAGES + """
    WHERE m.room = :room AND m.id > :since ORDER BY m.id DESC LIMIT :limit"""
UNDELIVERED = SELECT_MESSAGES + " WHERE m.id > :since ORDER BY m.id LIMIT :limit"
LAST_ID = "SELECT COALESCE(MAX(id), 0) FROM messages"
ROOM_STATS = """
    SELECT room, COUNT(*) AS messages, MAX(created_at) AS last_activity
    FROM messages GROUP BY room"""
NO_UPPER_BOUND = 2**63 - 1


async def recent_messages(database, room, limit, before=NO_UPPER_BOUND, since=None) -> list[dict]:
    """The newest `limit` messages of a room (before an id, or after one), oldest first."""
    if since is None:
        query, values = RECENT_MESSAGES, {"room": room, "before": before, "limit": limit}
    else:
        query, values = MESSAGES_AFTER, {"room": room, "since": since, "limit": limit}
    rows = await database.fetch_all(query, values)
    return [message_out(row) for row in reversed(rows)]


# --- Validation: shared by the WebSocket frames and the REST bodies ------------------------------


class Invalid(Exception):
    """A bad input: becomes an error frame on the socket, a 422 on REST."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


# The rules below, as regular expressions: /openapi.json publishes them, and the checks use them.
# (Lone surrogates, which JSON can smuggle in as "\ud800", are refused by check_text.)
ROOM_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
USERNAME_PATTERN = re.compile(r"^[^\s\x00-\x1f\x7f-\x9f]"
                              r"([^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$")
CONTENT_PATTERN = re.compile(r"^[^\x00]*[^\x00\s][^\x00]*$")


def check_text(value, field: str, max_length: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"invalid_{field}", f"{field} must be a non-empty string")
    if len(value) > max_length:
        raise Invalid(f"invalid_{field}", f"{field} is longer than {max_length} characters")
    try:
        value.encode("utf-8")  # fails on an unpaired surrogate, which PostgreSQL would refuse
    except UnicodeEncodeError:
        raise Invalid(f"invalid_{field}", f"{field} contains an unpaired surrogate") from None
    if "\x00" in value:
        raise Invalid(f"invalid_{field}", f"{field} contains a NUL")
    return value


def check_username(value) -> str:
    check_text(value, "username", MAX_USERNAME_LENGTH)
    if not USERNAME_PATTERN.fullmatch(value):
        raise Invalid("invalid_username", "username must not contain control characters "
                      "or start or end with a space")
    return value


def check_content(value) -> str:
    return check_text(value, "content", MAX_CONTENT_LENGTH)  # the rule CONTENT_PATTERN states


def check_room(value) -> str:
    if not isinstance(value, str) or not ROOM_PATTERN.fullmatch(value):
        raise Invalid("invalid_room", "room must be 1-32 of a-z, 0-9, '-' and '_', "
                      "starting with a letter or digit")
    return value


def check_id(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NO_UPPER_BOUND:
        raise Invalid(f"invalid_{field}", f"{field} must be a message id (an integer >= 0)")
    return value


# --- Security checks: tokens and origins ----------------------------------------------------------


def make_token(username: str, ttl: int = TOKEN_TTL_SECONDS) -> str:
    """A signed token that lets its holder speak as `username` until it expires."""
    now = utcnow()
    claims = {"sub": check_username(username), "iat": now, "exp": now + datetime.timedelta(seconds=ttl)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def token_user(token: str | None) -> str | None:
    """The username a valid, unexpired token of ours names; None for anything else."""
    try:
        claims = jwt.decode(token or "", SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        return check_username(claims["sub"])
    except (jwt.InvalidTokenError, Invalid):
        return None


def presented_token(connection: HTTPConnection) -> str | None:
    """?token= (browsers cannot set headers on a WebSocket) or Authorization: Bearer."""
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return connection.query_params.get("token")


def origin_allowed(connection: HTTPConnection) -> bool:
    """Browsers send Origin; a page from another site may not use a visitor's connection."""
    origin = connection.headers.get("origin")
    if origin is None or "*" in ALLOWED_ORIGINS or origin in ALLOWED_ORIGINS:
        return True
    return urlsplit(origin).netloc == connection.headers.get("host")


def writer_identity(request, username: str) -> None:
    """With a secret set, a REST write must carry a token for the user it writes as."""
    if not SECRET:
        return
    holder = token_user(presented_token(request))
    if holder is None:
        raise HTTPException(401, "a valid token is required: Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})
    if holder != username:
        raise HTTPException(403, f"this token is for {holder!r}")


# --- The hub: who is connected where, and delivery to them ---------------------------------------


def encode(frame: dict) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def system_frame(room: str, content: str, **extra) -> dict:
    return {"type": "system", "room": room, "content": content, "timestamp": iso(utcnow()), **extra}


class Client:
    """One WebSocket connection with its own outbox and writer task, so a slow reader stalls
    only itself. The writer runs while there is something to send: an idle client costs less."""

    def __init__(self, websocket: WebSocket, app, ip: str, room: str, identity: str | None = None):
        self.websocket, self.app, self.ip, self.room, self.identity = websocket, app, ip, room, identity
        self.username: str | None = None
        self.user_id: int | None = None
        self.outbox: deque[str] = deque()
        self.replay: list[tuple[int | None, str]] | None = None  # live frames held during a replay
        self.stalled = False
        self.closing: asyncio.Task | None = None  # the 1013 close of a client that stopped reading
        self.tokens, self.refilled, self.refused = RATE_BURST, time.monotonic(), 0
        self.writer: asyncio.Task | None = None

    def allow(self) -> bool:
        """Token bucket: RATE_BURST frames at once, RATE_PER_SECOND on average."""
        now = time.monotonic()
        self.tokens = min(RATE_BURST, self.tokens + (now - self.refilled) * RATE_PER_SECOND)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused = 0
            return True
        self.refused += 1
        return False

    async def write_pending(self):
        """Send the outbox in order, then end; push() starts it again."""
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected):
            while self.outbox:
                await self.websocket.send_text(self.outbox.popleft())

    def push(self, text: str, message_id: int | None = None) -> None:
        if self.stalled:
            return
        if self.replay is not None:
            self.replay.append((message_id, text))
            return
        if len(self.outbox) >= SEND_QUEUE_FRAMES:
            # It stopped reading: it leaves the room now and nothing more is queued for it. The
            # close frame reaches it if it ever reads again; until then its socket holds no more
            # than the transport's buffer, and counts against its address's connection limit.
            self.stalled = True
            self.stop_writing()
            background(self.app, part(self.app, self))
            self.closing = asyncio.create_task(self.close(1013, "too slow: send queue full", timeout=None))
            return
        self.outbox.append(text)
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self.write_pending())

    def stop_writing(self) -> None:
        self.outbox.clear()
        if self.writer:
            self.writer.cancel()

    def send(self, frame: dict) -> None:
        self.push(encode(frame))

    def error(self, code: str, content: str) -> None:
        self.send({"type": "error", "code": code, "content": content})

    def end_replay(self, notices: list[dict], history: list[dict]) -> None:
        """Send the notices, the history, then the live frames held meanwhile, skipping ids already sent."""
        held, self.replay = self.replay or [], None
        for notice in notices:
            self.send(notice)
        last_id = 0
        for message in history:
            self.send({"type": "message", **message})
            last_id = message["id"]
        for message_id, text in held:
            if message_id is None or message_id > last_id:
                self.push(text)

    async def close(self, code: int, reason: str, timeout: float | None = 2) -> None:
        """Send a close frame; it waits behind unread data, so give up after `timeout` seconds."""
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, asyncio.TimeoutError):
            await asyncio.wait_for(self.websocket.close(code, reason), timeout)


class Hub:
    """Rooms of joined clients. deliver() is the one place a broadcast enters."""

    def __init__(self):
        self.rooms: dict[str, dict[str, set[Client]]] = {}
        self.connections: set[Client] = set()  # every open socket, joined or not
        self.per_ip: Counter[str] = Counter()

    def refusal(self, ip: str) -> tuple[int, str] | None:
        """Why a new connection from this address may not stay, as (close code, reason); None if it may."""
        if len(self.connections) >= MAX_CONNECTIONS:
            return 1013, "the server is full; try again later"
        if self.per_ip[ip] >= MAX_CONNECTIONS_PER_IP:
            return 1008, "too many connections from your address"
        return None

    def connect(self, client: Client) -> None:
        self.connections.add(client)
        self.per_ip[client.ip] += 1

    def disconnect(self, client: Client) -> None:
        self.connections.discard(client)
        self.per_ip[client.ip] -= 1
        if not self.per_ip[client.ip]:
            del self.per_ip[client.ip]

    def add(self, client: Client) -> bool:
        """Register a joined client; True if it is the user's first connection in the room."""
        users = self.rooms.setdefault(client.room, {})
        first = client.username not in users
        users.setdefault(client.username, set()).add(client)
        return first

    def remove(self, client: Client) -> bool:
        """Unregister a client; True if it was the user's last connection in the room."""
        users = self.rooms.get(client.room, {})
        connections = users.get(client.username, set())
        if client not in connections:
            return False
        connections.discard(client)
        if connections:
            return False
        users.pop(client.username, None)
        if not users:
            self.rooms.pop(client.room, None)
        return True

    def deliver(self, room: str, frame: dict, exclude: Client | None = None) -> None:
        """Encode a frame once and queue it for every client in the room."""
        text = encode(frame)
        message_id = frame["id"] if frame["type"] == "message" else None
        # No copies needed: push() never changes the rooms (a stalled client leaves in a task).
        for connections in self.rooms.get(room, {}).values():
            for client in connections:
                if client is not exclude:
                    client.push(text, message_id)

    def active(self) -> dict[str, list[str]]:
        """Who is connected to this process, room by room."""
        return {room: sorted(users) for room, users in self.rooms.items()}


# --- The message writer: persistence, then broadcast, in id order --------------------------------


class MessageWriter:
    """Stores messages in batches (one transaction each) and delivers them in id order.

    It is the only thing that delivers messages, so every client sees ids in increasing order:
    a client replaying "everything after id N" and then going live sees no gap and no duplicate.
    On PostgreSQL (`shared`), other processes write too: each takes a lock while it inserts, so
    ids become visible in order, and NOTIFYs the newest id; the listener wakes this writer, which
    delivers whatever is stored after the last id it delivered.
    """

    BATCH = 100

    def __init__(self, database: Database, hub: Hub):
        self.database, self.hub = database, hub
        self.dialect = database.url.dialect
        # What is queued: (values, future) a message to store; a str, a username whose last_seen
        # to record; an int, the newest id another process stored; None, stop.
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batch: list = []  # what is being worked on; what a failed session leaves to the next
        self.last_delivered: int | None = None

    async def post(self, room: str, user_id: int, username: str, content: str) -> dict:
        """Store and broadcast one message; raises Unavailable if the database fails first."""
        done = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(({"room": room, "user_id": user_id, "username": username,
                                "content": content}, done))
        return await done

    def touch(self, username: str) -> None:
        """Record last_seen with the next batch: a thousand clients leaving at once cost one write."""
        self.queue.put_nowait(username)

    def wake(self, newest_id: int = NO_UPPER_BOUND) -> None:
        """Another process stored messages up to newest_id (or: check, after a reconnect)."""
        self.queue.put_nowait(newest_id)

    async def run(self):
        """Store and deliver what is queued, batch by batch, until stop() is called.

        Each session keeps one connection while it works (`databases` would otherwise open or
        check out one per statement). A session that fails, for any reason, fails every waiting
        sender at once ("unavailable"), and a new session starts in a new task, on a new
        connection, because `databases` ties a connection to the task that opened it.
        """
        while True:
            try:
                if await asyncio.create_task(self.session()):
                    return
            except DATABASE_ERRORS as exc:
                log.warning("the writer lost the database (%r); retrying", exc)
            except Exception:  # the supervisor: a writer that died would leave every sender waiting
                log.exception("the writer failed; starting over")
            if self.fail_waiting():
                return
            await asyncio.sleep(0.5)

    async def session(self) -> bool:
        """Work with one connection until stop() (True); a database failure raises."""
        async with self.database.connection():
            if self.last_delivered is None:
                self.last_delivered = await self.database.fetch_val(LAST_ID)
            while True:
                self.batch = self.batch or [await self.queue.get()]
                while not self.queue.empty() and len(self.batch) < self.BATCH:
                    self.batch.append(self.queue.get_nowait())
                await self.store([item for item in self.batch if isinstance(item, tuple)])
                await self.record_last_seen({item for item in self.batch if isinstance(item, str)})
                if any(isinstance(item, int) and item > self.last_delivered for item in self.batch):
                    await self.catch_up()
                if None in self.batch:
                    return True
                self.batch = []

    def fail_waiting(self) -> bool:
        """Tell every sender still waiting that its message was not stored; True if stop() came."""
        batch, self.batch = self.batch, [NO_UPPER_BOUND]  # once back: deliver what others stored meanwhile
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        for item in batch:
            if isinstance(item, tuple) and not item[1].done():
                item[1].set_exception(Unavailable())
        return None in batch

    async def stop(self, task: asyncio.Task) -> None:
        """Store everything accepted so far, then end the run() task."""
        self.queue.put_nowait(None)
        await task

    async def store(self, batch: list) -> None:
        """Store a batch in one statement, deliver it in id order, then answer its senders."""
        if not batch:
            return
        now = utcnow()
        rows = json.dumps([{"room": v["room"], "user_id": v["user_id"], "content": v["content"]}
                           for v, _ in batch])
        try:
            ids = sorted(row[0] for row in await self.database.fetch_all(
                INSERT_MESSAGES[self.dialect], {"batch": rows, "now": now, "lock": MESSAGES_LOCK}
                if self.dialect == "postgresql" else {"batch": rows, "now": now}))
        except DATABASE_ERRORS as exc:
            log.warning("storing %d message(s) failed: %r", len(batch), exc)
            raise
        messages = [{"id": id, "room": values["room"], "username": values["username"],
                     "content": values["content"], "timestamp": iso(now)}
                    for id, (values, _) in zip(ids, batch, strict=True)]
        if ids[0] == self.last_delivered + 1 and ids[-1] - ids[0] == len(ids) - 1:
            for message in messages:
                self.hub.deliver(message["room"], {"type": "message", **message})
            self.last_delivered = ids[-1]
        else:
            await self.catch_up()  # another process's messages come first
        for (_, done), message in zip(batch, messages, strict=True):
            if not done.done():  # the poster may have disconnected; the message still went out
                done.set_result(message)

    async def record_last_seen(self, usernames: set[str]) -> None:
        if not usernames:
            return
        try:
            await self.database.execute(TOUCH_USERS[self.dialect],
                                        {"usernames": json.dumps(sorted(usernames)), "now": utcnow()})
        except DATABASE_ERRORS as exc:  # best effort: the user has left either way
            log.warning("could not record last_seen of %d user(s): %r", len(usernames), exc)

    async def catch_up(self) -> None:
        """Deliver every stored message after the last one delivered, in id order."""
        try:
            while rows := await self.database.fetch_all(UNDELIVERED, {"since": self.last_delivered,
                                                                      "limit": 500}):
                for row in rows:
                    self.hub.deliver(row["room"], {"type": "message", **message_out(row)})
                    self.last_delivered = row["id"]
        except DATABASE_ERRORS as exc:  # the next wake-up (the listener reconnecting) tries again
            log.warning("catching up after id %d failed: %r", self.last_delivered, exc)


# --- Several processes: PostgreSQL LISTEN/NOTIFY and a presence table ----------------------------


class Cluster:
    """Makes processes sharing one PostgreSQL one chat: messages (see MessageWriter), notices and
    presence cross between them; a process that dies is noticed and its users are marked gone."""

    PRESENT_ELSEWHERE = """
        SELECT COUNT(*) FROM presence JOIN processes ON processes.id = presence.process
        WHERE room = :room AND username = :username AND process <> :me
          AND heartbeat > CURRENT_TIMESTAMP - CAST(:timeout AS DOUBLE PRECISION) * INTERVAL '1 second'"""
    ACTIVE = """
        SELECT DISTINCT room, username FROM presence JOIN processes ON processes.id = presence.process
        WHERE heartbeat > CURRENT_TIMESTAMP - CAST(:timeout AS DOUBLE PRECISION) * INTERVAL '1 second'
        ORDER BY room, username"""
    REAP = """
        DELETE FROM presence WHERE process IN (
            SELECT id FROM processes
            WHERE heartbeat < CURRENT_TIMESTAMP - CAST(:timeout AS DOUBLE PRECISION) * INTERVAL '1 second')
        RETURNING room, username"""

    def __init__(self, app):
        self.app, self.database = app, app.state.database
        self.me = uuid.uuid4().hex[:12]
        self.tasks: list[asyncio.Task] = []

    def values(self, **extra) -> dict:
        return {"me": self.me, "timeout": PRESENCE_TIMEOUT, **extra}

    async def start(self) -> None:
        await self.database.execute(
            "INSERT INTO processes (id, heartbeat) VALUES (:me, CURRENT_TIMESTAMP)", {"me": self.me})
        self.tasks = [asyncio.create_task(self.listen_forever()), asyncio.create_task(self.beat_forever())]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(*DATABASE_ERRORS):
            await self.database.execute("DELETE FROM processes WHERE id = :me", {"me": self.me})

    async def arrive(self, room: str, username: str) -> bool:
        """Record the user here; True if no other process has them in the room (so: announce)."""
        await self.database.execute(
            "INSERT INTO presence (process, room, username) VALUES (:me, :room, :username) "
            "ON CONFLICT DO NOTHING", {"me": self.me, "room": room, "username": username})
        return not await self.database.fetch_val(self.PRESENT_ELSEWHERE,
                                                 self.values(room=room, username=username))

    async def depart(self, room: str, username: str) -> bool:
        """Forget the user here; True if no other process has them in the room (so: announce)."""
        await self.database.execute(
            "DELETE FROM presence WHERE process = :me AND room = :room AND username = :username",
            {"me": self.me, "room": room, "username": username})
        return not await self.database.fetch_val(self.PRESENT_ELSEWHERE,
                                                 self.values(room=room, username=username))

    async def announce(self, frame: dict) -> None:
        payload = json.dumps({"from": self.me, "frame": frame})
        await self.database.fetch_val("SELECT pg_notify('chat_events', :payload)", {"payload": payload})

    async def active(self) -> dict[str, list[str]]:
        rooms: dict[str, list[str]] = {}
        for row in await self.database.fetch_all(self.ACTIVE, {"timeout": PRESENCE_TIMEOUT}):
            rooms.setdefault(row["room"], []).append(row["username"])
        return rooms

    def on_notify(self, connection, pid, channel: str, payload: str) -> None:
        if channel == "chat_messages":
            self.app.state.writer.wake(int(payload))
            return
        event = json.loads(payload)
        if event["from"] != self.me:
            self.app.state.hub.deliver(event["frame"]["room"], event["frame"])

    async def listen_forever(self) -> None:
        """A dedicated connection LISTENs; if it drops, reconnect with backoff and repair the gap."""
        delay = 0.25
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(str(self.database.url), timeout=10,
                                                   server_settings={"application_name": "chat-listener"})
                await connection.add_listener("chat_messages", self.on_notify)
                await connection.add_listener("chat_events", self.on_notify)
                self.app.state.writer.wake()  # deliver what was stored while nobody listened
                delay = 0.25
                while True:  # a terminated backend shows up here as an error within a second
                    await asyncio.sleep(1)
                    await connection.fetchval("SELECT 1", timeout=5)
            except (*DATABASE_ERRORS, asyncio.TimeoutError) as exc:
                log.warning("listener connection lost (%r); reconnecting in %.2f s", exc, delay)
            except Exception:  # a bug must not end the supervision silently: show it, and go on
                log.exception("listener failed; reconnecting in %.2f s", delay)
            finally:
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)

    async def beat_forever(self) -> None:
        """Renew our heartbeat; reap processes that stopped renewing theirs, and say their users left."""
        while True:
            await asyncio.sleep(PRESENCE_TIMEOUT / 3)
            try:
                renewed = await self.database.fetch_val(
                    "UPDATE processes SET heartbeat = CURRENT_TIMESTAMP WHERE id = :me RETURNING id",
                    {"me": self.me})
                if renewed is None:  # reaped while cut off from the database: register again
                    await self.database.execute(
                        "INSERT INTO processes (id, heartbeat) VALUES (:me, CURRENT_TIMESTAMP)", {"me": self.me})
                    for room, users in self.app.state.hub.active().items():
                        for username in users:
                            await self.arrive(room, username)
                gone = {(row["room"], row["username"])
                        for row in await self.database.fetch_all(self.REAP, {"timeout": PRESENCE_TIMEOUT})}
                await self.database.execute(
                    "DELETE FROM processes WHERE heartbeat < CURRENT_TIMESTAMP - "
                    "CAST(:timeout AS DOUBLE PRECISION) * INTERVAL '1 second'", {"timeout": PRESENCE_TIMEOUT})
                for room, username in sorted(gone):
                    if not await self.database.fetch_val(self.PRESENT_ELSEWHERE,
                                                         self.values(room=room, username=username)):
                        await announce(self.app, system_frame(room, f"{username} left the chat"))
                    self.app.state.writer.touch(username)
            except DATABASE_ERRORS as exc:
                log.warning("heartbeat failed: %r", exc)
            except Exception:  # a bug must not end the heartbeat silently: show it, and go on
                log.exception("heartbeat failed")


async def announce(app, frame: dict, exclude: Client | None = None) -> None:
    """A notice for a room: to this process's clients, and through PostgreSQL to the others'."""
    app.state.hub.deliver(frame["room"], frame, exclude=exclude)
    if app.state.cluster:
        await app.state.cluster.announce(frame)


async def say_joined(app, client: Client) -> None:
    """The user's first connection in the room, on any process, is announced."""
    if app.state.cluster and not await app.state.cluster.arrive(client.room, client.username):
        return
    await announce(app, system_frame(client.room, f"{client.username} joined the chat"), exclude=client)


async def say_left(app, room: str, username: str) -> None:
    """The user's last connection in the room, on any process, is announced."""
    if app.state.cluster and not await app.state.cluster.depart(room, username):
        return
    await announce(app, system_frame(room, f"{username} left the chat"))


async def active_users(app) -> dict[str, list[str]]:
    """Who is connected, room by room: this process's clients, or every live process's."""
    return await app.state.cluster.active() if app.state.cluster else app.state.hub.active()


def background(app, coroutine) -> None:
    """Run a coroutine in its own task, which shutdown waits for."""
    task = asyncio.create_task(coroutine)
    app.state.tasks.add(task)
    task.add_done_callback(app.state.tasks.discard)


# --- HTTP handlers -------------------------------------------------------------------------------


def query_int(request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and low <= int(raw) <= high):
        raise HTTPException(422, f"{name} must be an integer from {low} to {high}")
    return int(raw)


def query_room(request, default: str | None = DEFAULT_ROOM) -> str | None:
    room = request.query_params.get("room", default)
    try:
        return room if room is None else check_room(room)
    except Invalid as exc:
        raise HTTPException(422, exc.detail) from None


async def json_body(request) -> dict:
    # Only JSON: a cross-site form cannot send it without the browser asking us first (CORS).
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the body as application/json")
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(422, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    return body


async def list_messages(request):
    """The newest messages of a room, oldest first; page back with ?before=<oldest id seen>."""
    room = query_room(request)
    limit = query_int(request, "limit", 50, 1, 100)
    before = query_int(request, "before", NO_UPPER_BOUND, 1, NO_UPPER_BOUND)
    return JSONResponse(await recent_messages(request.app.state.database, room, limit, before))


async def post_message(request):
    body = await json_body(request)
    try:
        username, content = check_username(body.get("username")), check_content(body.get("content"))
        room = check_room(body.get("room", DEFAULT_ROOM))
    except Invalid as exc:
        raise HTTPException(422, exc.detail) from None
    writer_identity(request, username)
    user = await request.app.state.database.fetch_one(FIND_USER, {"username": username})
    if user is None:
        raise HTTPException(404, f"no user named {username!r}; create it with POST /users")
    message = await request.app.state.writer.post(room, user["id"], username, content)
    return JSONResponse(message, status_code=201)


class Messages(HTTPEndpoint):
    """GET and POST /messages on one route, so that a 405 lists both in its Allow header."""

    async def get(self, request):
        return await list_messages(request)

    async def post(self, request):
        return await post_message(request)


async def create_user(request):
    body = await json_body(request)
    try:
        username = check_username(body.get("username"))
    except Invalid as exc:
        raise HTTPException(422, exc.detail) from None
    writer_identity(request, username)
    database = request.app.state.database
    values = {"username": username}
    row = await database.fetch_one(CREATE_USER, {**values, "now": utcnow()})
    status = 201 if row else 200
    row = row or await database.fetch_one(FIND_USER, values)
    return JSONResponse({"id": row["id"], "username": row["username"],
                         "last_seen": iso(row["last_seen"])}, status_code=status)


async def list_active_users(request):
    room = query_room(request, default=None)
    rooms = await active_users(request.app)
    names = rooms.get(room, []) if room else sorted({name for users in rooms.values() for name in users})
    return JSONResponse(names)


async def list_rooms(request):
    """Rooms with messages or connected users: who is here, how many messages, last activity."""
    active = await active_users(request.app)
    stats = {row["room"]: row for row in await request.app.state.database.fetch_all(ROOM_STATS)}
    return JSONResponse([
        {"room": room, "active_users": active.get(room, []),
         "messages": stats[room]["messages"] if room in stats else 0,
         "last_activity": iso(stats[room]["last_activity"]) if room in stats else None}
        for room in sorted(set(stats) | set(active))])


FRAME_FORMATS = {
    "join": {"type": "join", "username": "string", "room": "string (optional)",
             "since": "integer (optional: last message id seen)"},
    "message": {"type": "message", "content": "string", "username": "string (optional)"},
    "leave": {"type": "leave"},
}


async def ws_info(request):
    """The WebSocket URL as this client reached us (host, port, ws or wss) and the frame formats."""
    scheme = "wss" if request.url.scheme == "https" else "ws"
    url = request.url.replace(scheme=scheme, path="/ws", query="", fragment="")
    return JSONResponse({"websocketUrl": str(url), "roomUrl": str(url) + "/{room}",
                         "messageFormats": FRAME_FORMATS, "errorCodes": ERROR_CODES})


async def openapi(request):
    return JSONResponse(OPENAPI)


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>chat API</title>
<link rel="stylesheet" href="/swagger/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


async def swagger(request):
    return HTMLResponse(SWAGGER_PAGE)


async def tester(request):
    return FileResponse(HERE / "static" / "test.html")


async def home(request):
    return RedirectResponse("/test")


async def http_error(request, exc: HTTPException):
    """Every HTTP error, the framework's own 404 and 405 included, is JSON with a detail."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def database_down(request, exc):
    log.warning("database error on %s %s: %r", request.method, request.url.path, exc)
    return JSONResponse({"detail": "the database is unavailable; try again shortly"}, status_code=503)


# --- The WebSocket handler -----------------------------------------------------------------------

ERROR_CODES = {
    "binary_frame": "a binary frame; send JSON as text",
    "frame_too_large": f"a frame over {MAX_FRAME_BYTES} bytes",
    "invalid_json": "the frame is not JSON",
    "not_object": "the frame is JSON but not an object",
    "unknown_type": "type is missing or not join, message or leave",
    "invalid_username": f"username missing, not a string, blank, over {MAX_USERNAME_LENGTH} "
                        "characters, or with control characters",
    "invalid_content": f"content missing, not a string, blank, over {MAX_CONTENT_LENGTH} "
                       "characters, or with a NUL",
    "invalid_room": "room is not 1-32 of a-z, 0-9, '-', '_'",
    "invalid_since": "since is not a message id (an integer >= 0)",
    "not_joined": "message or leave before join",
    "already_joined": "a second join on one connection (leave first)",
    "wrong_user": "username differs from the one this connection joined as",
    "unavailable": "the database is down; the frame was not stored, send it again later",
    "rate_limited": f"over RATE_PER_SECOND ({RATE_PER_SECOND:g}) frames a second; the frame was dropped",
}


def parse_frame(message: dict) -> dict:
    """Turn a raw ASGI receive into a frame dict with a known type, or raise Invalid."""
    text = message.get("text")
    if text is None:
        raise Invalid("binary_frame", "binary frames are not supported; send JSON as text")
    if len(text) > MAX_FRAME_BYTES:  # characters >= bytes / 4: a cheap first gate before parsing
        raise Invalid("frame_too_large", f"frames are limited to {MAX_FRAME_BYTES} bytes")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise Invalid("invalid_json", "the frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise Invalid("not_object", "the frame must be a JSON object")
    if frame.get("type") not in ("join", "message", "leave"):
        raise Invalid("unknown_type", "type must be one of: join, message, leave")
    return frame


def check_same_user(client: Client, frame: dict) -> None:
    """Tutorial clients repeat the username on every frame; it must be the joined one."""
    if client.username is None:
        raise Invalid("not_joined", "join first: {\"type\":\"join\",\"username\":\"...\"}")
    if "username" in frame and frame["username"] != client.username:
        raise Invalid("wrong_user", f"this connection is {client.username!r}")


async def on_join(app, client: Client, frame: dict) -> None:
    if client.username is not None:
        raise Invalid("already_joined", f"already joined as {client.username!r}; leave first")
    username = check_username(frame.get("username", client.identity))
    if client.identity and username != client.identity:
        raise Invalid("wrong_user", f"your token is for {client.identity!r}")
    room = check_room(frame.get("room", client.room))
    since = check_id(frame["since"], "since") if frame.get("since") is not None else None
    client.user_id = await app.state.database.fetch_val(UPSERT_USER, {"username": username, "now": utcnow()})
    client.username, client.room = username, room
    # Register before reading history: whatever is stored from now on is held in client.replay
    # and sent after the history, minus the ids the history already had.
    client.replay = []
    first = app.state.hub.add(client)
    notices = [system_frame(room, f"Welcome {username}!")]
    try:
        if since is None:
            history = await recent_messages(app.state.database, room, HISTORY_ON_JOIN)
        else:
            history = await recent_messages(app.state.database, room, REPLAY_LIMIT + 1, since=since)
            if len(history) > REPLAY_LIMIT:
                history = history[1:]
                notices.append(system_frame(
                    room, "More messages were missed than are replayed; load older ones with "
                    "GET /messages?before=<id>", code="history_truncated", before=history[0]["id"]))
        if first:
            await say_joined(app, client)
    except DATABASE_ERRORS:
        app.state.hub.remove(client)  # not joined after all: the client may try again
        client.username, client.replay = None, None
        raise
    client.end_replay(notices, history)


async def on_message(app, client: Client, frame: dict) -> None:
    check_same_user(client, frame)
    content = check_content(frame.get("content"))
    await app.state.writer.post(client.room, client.user_id, client.username, content)


async def on_leave(app, client: Client, frame: dict) -> None:
    check_same_user(client, frame)
    await part(app, client)
    client.send(system_frame(client.room, f"Goodbye {client.username}!"))
    client.username = None


async def part(app, client: Client) -> None:
    """Unregister a joined client; the user's last connection announces the leave."""
    room, username = client.room, client.username
    if username is None or client not in app.state.hub.rooms.get(room, {}).get(username, ()):
        return
    last_here = app.state.hub.remove(client)
    app.state.writer.touch(username)
    try:
        if last_here:
            await say_left(app, room, username)
    except DATABASE_ERRORS as exc:  # gone from this process already; the rest is best effort
        log.warning("could not record that %r left: %r", username, exc)


HANDLERS = {"join": on_join, "message": on_message, "leave": on_leave}


async def chat_socket(websocket: WebSocket):
    """Check the handshake, then handle one frame at a time until the socket goes."""
    app = websocket.app
    # Refused before accept: the client gets HTTP 403 and no socket is ever opened.
    if not origin_allowed(websocket):
        log.info("refused a WebSocket from origin %r", websocket.headers.get("origin"))
        await websocket.close(1008)
        return
    identity = token_user(presented_token(websocket)) if SECRET else None
    if SECRET and identity is None:
        log.info("refused a WebSocket without a valid token")
        await websocket.close(1008)
        return
    await websocket.accept()
    # Refused after accept, so that the client can read the close code and the reason.
    try:
        room = check_room(websocket.path_params.get("room", DEFAULT_ROOM))
    except Invalid as exc:
        await websocket.close(1008, exc.detail[:120])
        return
    ip = websocket.client.host if websocket.client else "unknown"
    refusal = app.state.hub.refusal(ip)
    if refusal:
        await websocket.close(*refusal)
        return
    client = Client(websocket, app, ip, room, identity)
    app.state.hub.connect(client)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if not client.allow():
                if client.refused > FLOOD_LIMIT:
                    await client.close(1008, "flooding: too many frames")
                    break
                client.error("rate_limited", f"over {RATE_PER_SECOND:g} frames a second; "
                             "this one was dropped")
                continue
            try:
                frame = parse_frame(message)
                await HANDLERS[frame["type"]](app, client, frame)
            except Invalid as exc:
                client.error(exc.code, exc.detail)
            except DATABASE_ERRORS as exc:
                log.warning("database error on a WebSocket frame: %r", exc)
                client.error("unavailable", "the database is unavailable; try again shortly")
    finally:
        app.state.hub.disconnect(client)
        client.stop_writing()
        # Its own task: leaving completes even if this handler is being cancelled.
        background(app, part(app, client))


async def upgrade_required(request):
    """A plain HTTP request to the WebSocket path: say how to connect instead of a bare 404."""
    return JSONResponse({"detail": "this is a WebSocket endpoint: connect with ws:// (see /ws-info)"},
                        status_code=426, headers={"Upgrade": "websocket"})


# --- OpenAPI: every endpoint, with the WebSocket protocol described on GET /ws --------------------

def _schema(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


_STR, _INT = {"type": "string"}, {"type": "integer"}
_MESSAGE = _schema({"id": _INT, "room": _STR, "username": _STR, "content": _STR,
                    "timestamp": {"type": "string", "format": "date-time"}},
                   ["id", "room", "username", "content", "timestamp"])
_USER = _schema({"id": _INT, "username": _STR, "last_seen": {"type": "string", "format": "date-time"}},
                ["id", "username", "last_seen"])
_ERROR = _schema({"detail": _STR}, ["detail"])


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {401: "No valid token (only with CHAT_SECRET set)", 403: "The token is for another user",
            404: "Not found", 415: "The body is not application/json", 422: "Invalid input",
            426: "Plain HTTP: connect with a WebSocket instead", 503: "Database unavailable"}
    return {str(code): _json({"$ref": "#/components/schemas/Error"}, text[code]) for code in codes}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_USERNAME = {"type": "string", "minLength": 1, "maxLength": MAX_USERNAME_LENGTH,
             "pattern": USERNAME_PATTERN.pattern}
_ROOM_QUERY = _query("room", {"type": "string", "pattern": ROOM_PATTERN.pattern}, "Room name")
_WRITE_SECURITY = [{}, {"bearer": []}]  # a token is needed only when CHAT_SECRET is set
_MSG_REF, _USER_REF = {"$ref": "#/components/schemas/Message"}, {"$ref": "#/components/schemas/User"}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "chat", "version": "1.0.0",
             "description": "Real-time chat: a WebSocket at /ws (see GET /ws) and this REST API."},
    "paths": {
        "/messages": {
            "get": {"tags": ["Messages"], "summary": "Recent messages of a room, oldest first",
                    "parameters": [
                        {**_ROOM_QUERY, "schema": {**_ROOM_QUERY["schema"], "default": DEFAULT_ROOM}},
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                               "How many messages"),
                        _query("before", {"type": "integer", "minimum": 1, "maximum": NO_UPPER_BOUND},
                               "Only messages with a smaller id: page backwards")],
                    "responses": {"200": _json({"type": "array", "items": _MSG_REF}, "Messages"),
                                  **_errors(422, 503)}},
            "post": {"tags": ["Messages"], "summary": "Send a message (broadcast to the room's sockets)",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _schema(
                         {"username": _USERNAME,
                          "content": {"type": "string", "minLength": 1, "maxLength": MAX_CONTENT_LENGTH,
                                      "pattern": CONTENT_PATTERN.pattern},
                          "room": {"type": "string", "pattern": ROOM_PATTERN.pattern,
                                   "default": DEFAULT_ROOM}},
                         ["username", "content"])}}},
                     "security": _WRITE_SECURITY,
                     "responses": {"201": _json(_MSG_REF, "The stored message"),
                                   **_errors(401, 403, 404, 415, 422, 503)}},
        },
        "/users": {
            "post": {"tags": ["Users"], "summary": "Create a user (200 with the user if it exists)",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _schema(
                         {"username": _USERNAME}, ["username"])}}},
                     "security": _WRITE_SECURITY,
                     "responses": {"201": _json(_USER_REF, "Created"), "200": _json(_USER_REF, "Exists"),
                                   **_errors(401, 403, 415, 422, 503)}},
        },
        "/users/active": {
            "get": {"tags": ["Users"], "summary": "Names of connected users, sorted",
                    "parameters": [_ROOM_QUERY],
                    "responses": {"200": _json({"type": "array", "items": _STR}, "Usernames"),
                                  **_errors(422)}},
        },
        "/rooms": {
            "get": {"tags": ["Rooms"], "summary": "Rooms with their active users, message count, last activity",
                    "responses": {"200": _json({"type": "array", "items": _schema(
                        {"room": _STR, "active_users": {"type": "array", "items": _STR}, "messages": _INT,
                         "last_activity": {"type": "string", "format": "date-time", "nullable": True}},
                        ["room", "active_users", "messages", "last_activity"])}, "Rooms"),
                        **_errors(503)}},
        },
        "/ws-info": {
            "get": {"tags": ["WebSocket"], "summary": "The WebSocket URL and frame formats",
                    "responses": {"200": _json({"type": "object"}, "Connection information")}},
        },
        "/ws": {
            "get": {"tags": ["WebSocket"], "summary": "The chat WebSocket (ws://HOST/ws or /ws/{room})",
                    "description": (
                        "Upgrade to a WebSocket; every frame is a JSON text frame with a `type`.\n\n"
                        "Client → server: `join` {username, room?, since?}, `message` {content}, `leave`.\n\n"
                        "Server → client: `system` {room, content, timestamp, code?}, "
                        "`message` {id, room, username, content, timestamp}, `error` {code, content}.\n\n"
                        "Error codes: " + "; ".join(f"`{k}`: {v}" for k, v in ERROR_CODES.items())),
                    "x-websocket-frames": FRAME_FORMATS,
                    "parameters": [_query("token", _STR, "A token from `python chat.py token NAME` "
                                          "(only with CHAT_SECRET set)")],
                    "responses": {"101": {"description": "Switching Protocols"}, **_errors(426)}},
        },
    },
    "components": {"schemas": {"Message": _MESSAGE, "User": _USER, "Error": _ERROR},
                   "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
}


# --- Lifespan, routes, app -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app):
    """Connect, create the schema, start the writer (and, on PostgreSQL, the cluster); on shutdown,
    store every message already accepted."""
    database = app.state.database
    await database.connect()
    lock = lock_sqlite_file(database) if database.url.dialect == "sqlite" else None
    await apply_schema(database)
    writer = asyncio.create_task(app.state.writer.run())
    if database.url.dialect == "postgresql":
        app.state.cluster = Cluster(app)
        await app.state.cluster.start()
    try:
        yield
    finally:
        await asyncio.gather(*app.state.tasks)
        await app.state.writer.stop(writer)
        if app.state.cluster:
            await app.state.cluster.stop()
        await database.disconnect()
        if lock:
            lock.close()


def create_app(database_url: str = DATABASE_URL, allowed_origins: list[str] = ALLOWED_ORIGINS) -> Starlette:
    routes = [
        Route("/", home),
        Route("/messages", Messages),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/active", list_active_users),
        Route("/rooms", list_rooms),
        Route("/ws-info", ws_info),
        Route("/openapi.json", openapi),
        Route("/swagger", swagger),
        Mount("/swagger/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path)),
        Route("/test", tester),
        WebSocketRoute("/ws", chat_socket),
        WebSocketRoute("/ws/{room}", chat_socket),
        Route("/ws", upgrade_required),
        Route("/ws/{room}", upgrade_required),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                             allow_headers=["Content-Type", "Authorization"])]
    handlers = {HTTPException: http_error, **{error: database_down for error in DATABASE_ERRORS}}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.database = open_database(database_url)
    app.state.hub = Hub()
    app.state.tasks = set()
    app.state.cluster = None
    app.state.writer = MessageWriter(app.state.database, app.state.hub)
    return app


app = create_app()


class Server(uvicorn.Server):
    """uvicorn closes WebSockets with 1012 when it stops; say 1001 (going away) to each first."""

    async def shutdown(self, sockets=None):
        await asyncio.gather(*(client.close(1001, "server shutting down")
                               for client in list(app.state.hub.connections)))
        await super().shutdown(sockets=sockets)


def main(argv: list[str]) -> None:
    """python chat.py: serve. python chat.py token NAME: print a token for NAME."""
    if argv[:1] == ["token"]:
        if not SECRET or len(argv) != 2:
            sys.exit("usage: CHAT_SECRET=... python chat.py token USERNAME")
        print(make_token(argv[1]))
        return
    logging.basicConfig(level=logging.INFO)
    # Small frames and no per-message deflate: a chat line needs neither 16 MiB nor compression.
    config = uvicorn.Config(
        app, host=HOST, port=PORT, ws_max_size=4 * MAX_FRAME_BYTES, ws_per_message_deflate=False,
        ws_ping_interval=PING_INTERVAL, ws_ping_timeout=PING_TIMEOUT, timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        proxy_headers=bool(TRUSTED_PROXIES), forwarded_allow_ips=TRUSTED_PROXIES or None,
        ssl_keyfile=os.environ.get("SSL_KEYFILE"), ssl_certfile=os.environ.get("SSL_CERTFILE"))
    Server(config).run()


if __name__ == "__main__":
    main(sys.argv[1:])
