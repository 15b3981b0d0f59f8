-- The one schema for SQLite and PostgreSQL, applied at every start (so every statement is idempotent),
-- after the steps of upgrades.sql that bring an earlier version's database to it.
--
-- One divergence, made visible: SQLite numbers rows itself only for a column declared exactly
-- "INTEGER PRIMARY KEY" (AUTOINCREMENT: never an id given before), which PostgreSQL does not number
-- at all. chat.py's apply_schema() rewrites that to "BIGSERIAL PRIMARY KEY" on PostgreSQL (a
-- sequence never gives an id twice either); nothing else differs.
--
-- Timestamps are written by chat.py in UTC: TIMESTAMPTZ on PostgreSQL; on SQLite, text such as
-- "2026-11-25 10:00:00.123456" (SQLAlchemy's format, UTC without a zone), read back by chat.iso().

CREATE TABLE IF NOT EXISTS users (
    id        INTEGER PRIMARY KEY,
    username  TEXT NOT NULL UNIQUE CHECK (length(username) BETWEEN 1 AND 32),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS messages (
    -- AUTOINCREMENT: an id is never given again, even after the newest messages are deleted (a
    -- client that saw it would take the next message for one it has).
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Room names compare byte by byte (SQLite's BINARY; chat.py makes PostgreSQL a "binary" too,
    -- whatever the database's locale), so GET /rooms pages in the order Python sorts them.
    room       TEXT COLLATE "binary" NOT NULL DEFAULT 'general' CHECK (length(room) BETWEEN 1 AND 32),
    user_id    BIGINT NOT NULL REFERENCES users (id),
    content    TEXT NOT NULL CHECK (length(content) BETWEEN 1 AND 2000),
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    -- The sender's own id for the message, if it gave one: a resend (after "unavailable", a 503
    -- or a reconnect) with the same one is the same message, stored once (upgrades.sql, step 3).
    client_id  TEXT CHECK (length(client_id) BETWEEN 1 AND 64)
);
-- Partial: messages without one (the tutorial's clients send none) cost the index nothing.
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id ON messages (user_id, client_id) WHERE client_id IS NOT NULL;

-- Every message query is "this room, by id": history on join, paging, replay after a reconnect.
CREATE INDEX IF NOT EXISTS messages_room_id ON messages (room, id);
-- A user's messages: retention's "users with none left", delete-user, and the foreign key's check
-- when a user is deleted would each read every message without it.
CREATE INDEX IF NOT EXISTS messages_user_id ON messages (user_id);

-- One user per look: names that a reader cannot tell apart ("alice", "аlice" with a Cyrillic а,
-- "aIice" with a capital I, "ALICE") share a look (Unicode's UTS #39 skeleton, of the name as
-- written and of its case fold: chat.py's looks()), and the first name to claim a look keeps it.
CREATE TABLE IF NOT EXISTS looks (
    look TEXT PRIMARY KEY,
    username TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS looks_username ON looks (username);

-- Messages an operator deleted (python chat.py delete-message, delete-user): every process reads
-- the new ones each second and tells the clients in their room, so that the message leaves the
-- screens already showing it. The newest 10,000 are kept (chat.py's DELETIONS_KEPT).
CREATE TABLE IF NOT EXISTS deletions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BIGINT NOT NULL,
    room       TEXT NOT NULL
);

-- Tokens an operator took back (python chat.py delete-user, rename-user): a token for `username`
-- made before `before` (a Unix time) is refused, as an expired one is; a token made after works.
CREATE TABLE IF NOT EXISTS revoked (
    username TEXT PRIMARY KEY,
    before   DOUBLE PRECISION NOT NULL
);

-- Several processes on one PostgreSQL (see Cluster in chat.py): who is connected where. A process
-- renews its heartbeat every few seconds; one that stops is reaped by the others, with its users.
-- Unused, and harmless, on SQLite, which serves one process.
CREATE TABLE IF NOT EXISTS processes (
    id        TEXT PRIMARY KEY,
    heartbeat TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS presence (
    process  TEXT NOT NULL REFERENCES processes (id) ON DELETE CASCADE,
    room     TEXT NOT NULL,
    username TEXT NOT NULL,
    PRIMARY KEY (process, room, username)
);
-- Every join and leave asks whether another process has the user in the room: without this, each
-- asking reads everyone present, and a storm of 10,000 joins or leaves costs seconds a thousand.
CREATE INDEX IF NOT EXISTS presence_room_username ON presence (room, username);

-- The schema's version (the last step of upgrades.sql it has) and the database's identity, a
-- random id made with it: a restored copy gets a new one (python chat.py backup), and a client
-- that sees it change starts over, since message ids may have gone back.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
