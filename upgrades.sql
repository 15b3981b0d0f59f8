-- What brings a database made by an earlier commit to schema.sql: steps in order, each named,
-- each idempotent. At start, chat.py's apply_schema() runs, in one transaction, the steps past
-- the version the database records (meta's schema_version; a database from before has none,
-- so all of them), then schema.sql, then records the newest step's number; one log line a step.
-- Each statement ends with ";" (and holds no other); one marked "-- postgresql only" is
-- PostgreSQL's alone. An ADD COLUMN of a column the table has is skipped (SQLite has no ADD
-- COLUMN IF NOT EXISTS). A step that adds a column or drops a table is also what lets a database
-- have it missing or extra: anything else that differs from schema.sql is refused. Earlier
-- commits' schemas: fixtures/schema/<commit>.sql.

-- step 1: dropped the table skeletons, if any (look-alike records of a9fad39; its users' looks are claimed again at start)
DROP TABLE IF EXISTS skeletons;

-- step 2: messages.room compares byte by byte, as schema.sql declares (a table from before 7605b59 kept the database's locale)
ALTER TABLE messages ALTER COLUMN room TYPE TEXT COLLATE "binary";  -- postgresql only

-- step 3: added the column messages.client_id (62eee87)
ALTER TABLE messages ADD COLUMN client_id TEXT CHECK (length(client_id) BETWEEN 1 AND 64);

-- step 4: the index messages_client_id leaves out messages without one (dbc93da); schema.sql makes it again
DROP INDEX IF EXISTS messages_client_id;

-- step 5: message ids are never given again, even after the newest are deleted (SQLite: AUTOINCREMENT)
CREATE TABLE messages_numbered (id INTEGER PRIMARY KEY AUTOINCREMENT, room TEXT COLLATE "binary" NOT NULL DEFAULT 'general' CHECK (length(room) BETWEEN 1 AND 32), user_id BIGINT NOT NULL REFERENCES users (id), content TEXT NOT NULL CHECK (length(content) BETWEEN 1 AND 2000), created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP, client_id TEXT CHECK (length(client_id) BETWEEN 1 AND 64));  -- sqlite only
INSERT INTO messages_numbered (id, room, user_id, content, created_at, client_id) SELECT id, room, user_id, content, created_at, client_id FROM messages;  -- sqlite only
DROP TABLE messages;  -- sqlite only
ALTER TABLE messages_numbered RENAME TO messages;  -- sqlite only

-- step 6: every user's looks are claimed again at start, a look in capitals among them ("ВUDI SANTOSO" with a Cyrillic В)
DROP TABLE IF EXISTS looks;

-- step 7: added the table deletions, which tells open screens of deleted messages (schema.sql makes it)

-- step 8: added the table revoked, which takes back the tokens of deleted and renamed users (schema.sql makes it)
