"""Append-only schema migrations. Never edit a migration once it has landed: add a new one."""

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("attune")


def _run(db: Database, script: str) -> None:
    """Run each statement inside the migration's transaction (``executescript`` would commit early)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


# Over 60 lines on purpose: the first schema, one CREATE per table; landed migrations are never edited.
@migrations()
def m001_initial(db: Database) -> None:
    _run(
        db,
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT NOT NULL,
            personalization INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL
        );
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            key_id TEXT NOT NULL UNIQUE,
            secret_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        );
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            title TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'ui',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX idx_conversations_user ON conversations(user_id, updated_at);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete',
            source TEXT NOT NULL DEFAULT 'ui',
            model TEXT,
            adapter_version INTEGER,
            memory_ids TEXT NOT NULL DEFAULT '[]',
            gen_settings TEXT NOT NULL DEFAULT '{}',
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_ms REAL,
            latency_ms REAL,
            replaced_by INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_messages_conversation ON messages(conversation_id, id);
        CREATE INDEX idx_messages_user ON messages(user_id, id);
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('like', 'dislike', 'clear', 'correction')),
            correction TEXT,
            source TEXT NOT NULL DEFAULT 'ui',
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_feedback_message ON feedback(message_id, id);
        CREATE INDEX idx_feedback_user ON feedback(user_id, id);
        """
    )


@migrations()
def m002_personalization(db: Database) -> None:
    _run(
        db,
        """
        CREATE TABLE adapter_versions (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            path TEXT,
            base_model TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('published', 'rejected', 'pruned')),
            parent_version INTEGER,
            job_id INTEGER,
            metrics TEXT NOT NULL DEFAULT '{}',
            gate_reason TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (user_id, version)
        );
        CREATE TABLE active_adapters (
            user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            version INTEGER,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL DEFAULT 'train',
            trigger TEXT NOT NULL DEFAULT 'manual',
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'published', 'rejected', 'failed')),
            pid INTEGER,
            progress TEXT NOT NULL DEFAULT '{}',
            losses TEXT NOT NULL DEFAULT '[]',
            result TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        );
        CREATE INDEX idx_jobs_user ON jobs(user_id, id);
        CREATE TABLE replay_examples (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            example TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_replay_user ON replay_examples(user_id, id)
        """,
    )


@migrations()
def m003_memories(db: Database) -> None:
    _run(
        db,
        """
        CREATE TABLE memories (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('turn', 'correction', 'liked', 'fact')),
            text TEXT NOT NULL,
            message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL
        );
        CREATE INDEX idx_memories_user ON memories(user_id, id);
        CREATE INDEX idx_memories_message ON memories(message_id)
        """,
    )


@migrations()
def m005_memory_ids_and_exclusions(db: Database) -> None:
    """Memory ids double as FAISS ids, so they must never be reused (AUTOINCREMENT), and a memory's
    text must never change under its vector (delete it and add a new one instead). Messages whose
    memory the user deleted are listed in ``memory_exclusions`` so they never become memory again."""
    _run(
        db,
        """
        CREATE TABLE memories_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('turn', 'correction', 'liked', 'fact')),
            text TEXT NOT NULL,
            message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL
        );
        INSERT INTO memories_new (id, user_id, kind, text, message_id, created_at)
            SELECT id, user_id, kind, text, message_id, created_at FROM memories;
        DROP TABLE memories;
        ALTER TABLE memories_new RENAME TO memories;
        CREATE INDEX idx_memories_user ON memories(user_id, id);
        CREATE INDEX idx_memories_message ON memories(message_id);
        CREATE TABLE memory_exclusions (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            PRIMARY KEY (user_id, message_id)
        );
        CREATE INDEX idx_memory_exclusions_message ON memory_exclusions(message_id)
        """,
    )
    # One statement with its own ";" inside, so not through _run (which splits on ";").
    db.execute(
        "CREATE TRIGGER memories_text_immutable BEFORE UPDATE OF text, user_id ON memories BEGIN "
        "SELECT RAISE(ABORT, 'A memory''s text and owner never change: delete it and add a new one.'); END"
    )


@migrations()
def m006_memory_statements(db: Database) -> None:
    """Memory keeps clean statements: a new kind ``statement`` (a sentence the user said about themselves, keyed
    by their message), a ``policy`` number per row (rows derived under an older policy, e.g. the ``turn`` dumps
    of "User: … Assistant: …", are re-derived from the messages by the memory service: nothing is lost, the
    messages stay the source) and per-text exclusions (deleting one statement of a message keeps its others).
    Ids stay AUTOINCREMENT and never reused: the sequence is carried over."""
    _run(
        db,
        """
        CREATE TABLE memories_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK (kind IN ('statement', 'turn', 'correction', 'liked', 'fact')),
            text TEXT NOT NULL,
            message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            policy INTEGER NOT NULL DEFAULT 1
        );
        INSERT INTO memories_new (id, user_id, kind, text, message_id, created_at, policy)
            SELECT id, user_id, kind, text, message_id, created_at, 1 FROM memories;
        DELETE FROM sqlite_sequence WHERE name = 'memories_new';
        INSERT INTO sqlite_sequence (name, seq)
            SELECT 'memories_new', MAX(seq) FROM (
                SELECT seq FROM sqlite_sequence WHERE name = 'memories' UNION ALL
                SELECT COALESCE(MAX(id), 0) FROM memories);
        DROP TABLE memories;
        ALTER TABLE memories_new RENAME TO memories;
        CREATE INDEX idx_memories_user ON memories(user_id, id);
        CREATE INDEX idx_memories_message ON memories(message_id);
        CREATE TABLE memory_text_exclusions (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (user_id, message_id, text)
        );
        CREATE INDEX idx_memory_text_exclusions_message ON memory_text_exclusions(message_id)
        """,
    )
    db.execute(
        "CREATE TRIGGER memories_text_immutable BEFORE UPDATE OF text, user_id ON memories BEGIN "
        "SELECT RAISE(ABORT, 'A memory''s text and owner never change: delete it and add a new one.'); END"
    )


@migrations()
def m007_sessions_and_key_names(db: Database) -> None:
    """Browser sessions live here (only a SHA-256 of the random session id is stored; revoking one
    sets ``revoked_at``), and API keys get a name the user chooses so they can tell them apart."""
    _run(
        db,
        """
        CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            token_hash TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL,
            revoked_at TEXT
        );
        CREATE INDEX idx_sessions_user ON sessions(user_id, id);
        ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT ''
        """,
    )


@migrations()
def m008_memory_cues_and_updates(db: Database) -> None:
    """A memory may be found by another text than its own (``cue``: a correction or a liked answer is found
    by the question it answers, never served as a fact to other questions) or by its own text together with
    the message it was said in (``context``), may say what one-valued topic of the user it is about
    (``topic``: home, job, name of the dog...), and may be replaced by a newer memory of the same topic
    (``replaced_by``: kept as history for the Memory tab, never retrieved)."""
    _run(
        db,
        """
        ALTER TABLE memories ADD COLUMN cue TEXT;
        ALTER TABLE memories ADD COLUMN context TEXT;
        ALTER TABLE memories ADD COLUMN topic TEXT;
        ALTER TABLE memories ADD COLUMN replaced_by INTEGER;
        CREATE INDEX idx_memories_topic ON memories(user_id, topic) WHERE topic IS NOT NULL;
        CREATE INDEX idx_memories_replaced_by ON memories(replaced_by) WHERE replaced_by IS NOT NULL
        """,
    )


@migrations()
def m009_auth_failures(db: Database) -> None:
    """Failed sign-ins and bad API keys, so guessing can be throttled across restarts and server processes
    (``storage.throttle``); rows older than their window are deleted as new ones come."""
    _run(
        db,
        """
        CREATE TABLE auth_failures (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('password', 'api_key')),
            name TEXT NOT NULL DEFAULT '',
            address TEXT NOT NULL DEFAULT '',
            at REAL NOT NULL
        );
        CREATE INDEX idx_auth_failures_name ON auth_failures(kind, name, at);
        CREATE INDEX idx_auth_failures_address ON auth_failures(kind, address, at)
        """,
    )


@migrations()
def m010_damaged_adapter_versions(db: Database) -> None:
    """A published version whose files turn out damaged (truncated, garbage) is marked ``damaged``, with what
    was wrong in ``damage``: it is never served or made active again, and serving falls back to an older
    version (``assistant.chat.adapters.fall_back``). SQLite cannot alter a CHECK, so the table is rebuilt."""
    _run(
        db,
        """
        CREATE TABLE adapter_versions_new (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            path TEXT,
            base_model TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('published', 'rejected', 'pruned', 'damaged')),
            parent_version INTEGER,
            job_id INTEGER,
            metrics TEXT NOT NULL DEFAULT '{}',
            gate_reason TEXT,
            created_at TEXT NOT NULL,
            damage TEXT,
            UNIQUE (user_id, version)
        );
        INSERT INTO adapter_versions_new (id, user_id, version, path, base_model, status, parent_version, job_id,
                                          metrics, gate_reason, created_at)
            SELECT id, user_id, version, path, base_model, status, parent_version, job_id, metrics, gate_reason,
                   created_at FROM adapter_versions;
        DROP TABLE adapter_versions;
        ALTER TABLE adapter_versions_new RENAME TO adapter_versions
        """,
    )


@migrations()
def m011_memory_asked(db: Database) -> None:
    """A statement said in reply to a question of the other side ("Where are you based?" - "Porto, for now") is
    also found by that question (``asked``: its question sentences), with its text and message."""
    _run(db, "ALTER TABLE memories ADD COLUMN asked TEXT")


@migrations()
def m012_adapter_objects(db: Database) -> None:
    """A version uploaded to the adapter store (``--adapter-store``, ``storage.objects``) records where
    (``location``: the URL of its objects) and what (``files``: JSON, each file's bytes and SHA-256), so a server
    whose data dir lacks it downloads and checks it on first use. NULL on versions kept only in the data dir."""
    _run(db, "ALTER TABLE adapter_versions ADD COLUMN location TEXT; "
             "ALTER TABLE adapter_versions ADD COLUMN files TEXT")


@migrations()
def m013_job_leases(db: Database) -> None:
    """Jobs that ``launch.py worker`` processes claim from the queue: which worker holds one (``worker_id``) and until
    when (``lease_until``, ISO time, renewed while the job runs; a lapsed lease fails the job). Jobs the in-process
    runner starts leave both NULL. The index serves the claim (the oldest queued job) and the open-job checks."""
    _run(
        db,
        """
        ALTER TABLE jobs ADD COLUMN worker_id TEXT;
        ALTER TABLE jobs ADD COLUMN lease_until TEXT;
        CREATE INDEX idx_jobs_open ON jobs(status, id) WHERE status IN ('queued', 'running')
        """,
    )


@migrations()
def m014_memory_epochs(db: Database) -> None:
    """A counter per user that every insert, update or delete of one of their memory rows raises (triggers), so a
    serving process holding the user's memory index in RAM learns with one primary-key read per retrieval whether
    any other process (another server on the same database, a job, the CLI) changed the rows behind it. Counters
    start when the user's memories next change; a missing row reads as 0."""
    bump = ("INSERT INTO memory_epochs (user_id, epoch) VALUES ({who}.user_id, 1) "
            "ON CONFLICT(user_id) DO UPDATE SET epoch = epoch + 1")
    db.execute("CREATE TABLE memory_epochs (user_id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL DEFAULT 0)")
    for event, who in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):  # one statement each: BEGIN ...; END
        db.execute(f"CREATE TRIGGER memories_epoch_{event.lower()} AFTER {event} ON memories "
                   f"BEGIN {bump.format(who=who)}; END")
