-- attache's scale-out schema. Applied at every start under an advisory lock,
-- so it is written to be idempotent.

-- One row per stream: its metadata as JSON (attache_storage::StreamInfo),
-- a version bumped on every committed change (instances keep the newest they
-- have seen), and when it was last read or written (sliding TTL, flushed by
-- each instance about once a second). `path` is the name: NULL for a stream
-- deleted while forks read through it whose path a new stream took (it lives
-- on under its id until its last fork goes).
CREATE TABLE IF NOT EXISTS attache_streams (
    id BIGINT PRIMARY KEY,
    path TEXT UNIQUE,
    info TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_access_ms BIGINT NOT NULL
);

-- Tables made before names could be given up.
ALTER TABLE attache_streams ALTER COLUMN path DROP NOT NULL;

CREATE SEQUENCE IF NOT EXISTS attache_stream_ids;

-- One row per append (binary) or per message (JSON mode), keyed by its start position.
CREATE TABLE IF NOT EXISTS attache_chunks (
    stream_id BIGINT NOT NULL,
    pos BIGINT NOT NULL,
    ends_append BOOLEAN NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (stream_id, pos)
);

-- Idempotent producers: committed in the same transaction as the appends they guard.
CREATE TABLE IF NOT EXISTS attache_producers (
    stream_id BIGINT NOT NULL,
    producer TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (stream_id, producer)
);

-- Guarded appends (StreamStore::append_guarded): where the newest append of
-- each key to a stream began, written in the same transaction as the append
-- under the stream's row lock. Rows go with their stream.
CREATE TABLE IF NOT EXISTS attache_row_keys (
    stream_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    pos BIGINT NOT NULL,
    PRIMARY KEY (stream_id, key)
);

-- Content-addressed blobs in the object store: how many streams hold each,
-- and until when an upload in flight keeps it from collection.
CREATE TABLE IF NOT EXISTS attache_blobs (
    sha256 TEXT PRIMARY KEY,
    len BIGINT NOT NULL,
    refs BIGINT NOT NULL,
    pinned_until_ms BIGINT NOT NULL
);

-- The registry: entities (JSON attache_storage::EntityRecord) and grants.
CREATE TABLE IF NOT EXISTS attache_entities (
    url TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    version BIGINT NOT NULL
);

CREATE SEQUENCE IF NOT EXISTS attache_grant_ids;

CREATE TABLE IF NOT EXISTS attache_grants (
    entity_url TEXT NOT NULL,
    id BIGINT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (entity_url, id)
);

-- Grants whose entity is gone, which versions before session 21 could keep
-- when a grant raced a purge: removed at every start, so none reaches an
-- entity spawned at its URL later (a grant is now written only into the
-- entity's current life, attache_storage::NewGrant::incarnation).
DELETE FROM attache_grants g WHERE NOT EXISTS (SELECT 1 FROM attache_entities e WHERE e.url = g.entity_url);
