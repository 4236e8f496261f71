"""The PostgreSQL schema of buildfleet's database, as versioned migrations.

``MIGRATIONS[0]`` is version 1, ``MIGRATIONS[1]`` version 2, and so on.  A
migration is one SQL script (several statements allowed) that
`buildfleet.postgres.migrations.migrate` runs in its own transaction; to change the
schema, append a script -- never edit one that has shipped, since databases already
at that version will not run it again.  Names are never schema-qualified: every
object lives in the connection's ``search_path`` schema.  Stage and state numbers
in the scripts are those of `buildfleet.scheduler.model` (stage 2 QUEUED, 3
EXECUTING, 4 COMPLETED); the scripts are history and are never rewritten.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # version 1: the rows of the write-behind store (the SQLite schema's columns,
    # in PostgreSQL types).
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY, instance text NOT NULL,
        action_hash text NOT NULL, action_size bigint NOT NULL, action bytea NOT NULL,
        requirements text NOT NULL, priority bigint NOT NULL, cacheable bigint NOT NULL,
        timeout double precision NOT NULL, queued_at double precision NOT NULL,
        seq bigint NOT NULL, stage bigint NOT NULL, attempts bigint NOT NULL, response bytea,
        lease_id text, lease_session text, lease_state bigint,
        failed_on text NOT NULL, last_failure text NOT NULL, completed_at double precision,
        worker text NOT NULL
    );
    CREATE INDEX jobs_instance ON jobs (instance);
    CREATE TABLE operations (
        name text PRIMARY KEY, instance text NOT NULL, job_id text NOT NULL,
        created_at double precision NOT NULL, cancelled bigint NOT NULL, own_response bytea
    );
    CREATE INDEX operations_instance ON operations (instance);
    CREATE TABLE sessions (
        name text PRIMARY KEY, instance text NOT NULL, bot_id text NOT NULL,
        status bigint NOT NULL, properties text NOT NULL, capacity bigint NOT NULL,
        created_at double precision NOT NULL, version bigint NOT NULL, worker bytea NOT NULL
    );
    CREATE INDEX sessions_instance ON sessions (instance);
    """,
    # version 2: the replicated scheduler's own tables (buildfleet.scheduler.replicated),
    # where the database, not a process, holds the state.  Requirements and bot
    # properties are {"key": [values]} objects, so that `@>` matches them.
    """
    CREATE TABLE grid_jobs (
        id text PRIMARY KEY,
        instance text NOT NULL,
        action_hash text NOT NULL,
        action_size bigint NOT NULL,
        action bytea NOT NULL,
        requirements jsonb NOT NULL,
        priority integer NOT NULL,
        cacheable boolean NOT NULL,
        timeout double precision NOT NULL,
        queued_at double precision NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY,
        stage smallint NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        response bytea,
        lease_id text,
        lease_session text,
        lease_state smallint,
        lease_delivered boolean NOT NULL DEFAULT false,
        started_at double precision,
        failed_on jsonb NOT NULL DEFAULT '[]',
        last_failure text NOT NULL DEFAULT '',
        unmatched_since double precision,
        completed_at double precision,
        succeeded boolean NOT NULL DEFAULT false,  -- a bot's result, OK with exit code 0
        worker text NOT NULL DEFAULT ''
    );
    -- The queue: what a bot's claim scans, most urgent first.
    CREATE INDEX grid_jobs_queue ON grid_jobs (instance, priority, seq) WHERE stage = 2;
    CREATE INDEX grid_jobs_running ON grid_jobs (instance, started_at) WHERE stage = 3;
    CREATE INDEX grid_jobs_lease_session ON grid_jobs (lease_session)
        WHERE lease_session IS NOT NULL;
    CREATE INDEX grid_jobs_finished ON grid_jobs (instance, completed_at) WHERE stage = 4;
    CREATE INDEX grid_jobs_action ON grid_jobs (instance, action_hash, action_size);
    -- One unfinished cacheable job per action, whichever replica queued it.
    CREATE UNIQUE INDEX grid_jobs_in_flight ON grid_jobs (instance, action_hash, action_size)
        WHERE cacheable AND stage <> 4;

    CREATE TABLE grid_operations (
        name text PRIMARY KEY,
        instance text NOT NULL,
        job_id text NOT NULL REFERENCES grid_jobs (id) ON DELETE CASCADE,
        created_at double precision NOT NULL,
        cancelled boolean NOT NULL DEFAULT false,
        own_response bytea
    );
    CREATE INDEX grid_operations_job ON grid_operations (job_id);
    CREATE INDEX grid_operations_instance ON grid_operations (instance, created_at, name);

    CREATE TABLE grid_sessions (
        name text PRIMARY KEY,
        instance text NOT NULL,
        bot_id text NOT NULL,
        status smallint NOT NULL,
        properties jsonb NOT NULL,
        capacity integer NOT NULL,
        created_at double precision NOT NULL,
        last_seen double precision NOT NULL,
        version bigint NOT NULL DEFAULT 0,
        worker bytea NOT NULL
    );
    CREATE UNIQUE INDEX grid_sessions_bot ON grid_sessions (instance, bot_id);
    CREATE INDEX grid_sessions_seen ON grid_sessions (instance, last_seen);

    CREATE TABLE grid_closed_sessions (
        name text PRIMARY KEY,
        instance text NOT NULL,
        reason text NOT NULL,
        closed_at double precision NOT NULL
    );

    CREATE TABLE grid_bot_events (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session text NOT NULL,
        bot_id text NOT NULL,
        time double precision NOT NULL,
        type text NOT NULL,
        message text NOT NULL
    );
    CREATE INDEX grid_bot_events_session ON grid_bot_events (session, id);
    """,
    # version 3: blobs of `postgres` storage (an action cache every replica shares).
    # A `namespace` keeps the stores of several configured storages apart.
    """
    CREATE TABLE blobs (
        namespace text NOT NULL,
        hash text NOT NULL,
        size bigint NOT NULL,
        data bytea NOT NULL,
        last_access double precision NOT NULL,
        PRIMARY KEY (namespace, hash, size)
    );
    """,
    # version 4: a job that succeeded keeps its action's slot in the unique index
    # for a moment (`dedup`, cleared by housekeeping), so that a submission racing
    # with its completion joins it instead of queuing the action again.
    """
    ALTER TABLE grid_jobs ADD COLUMN dedup boolean NOT NULL DEFAULT false;
    DROP INDEX grid_jobs_in_flight;
    CREATE UNIQUE INDEX grid_jobs_dedup ON grid_jobs (instance, action_hash, action_size)
        WHERE cacheable AND (stage <> 4 OR dedup);
    CREATE INDEX grid_jobs_dedup_finished ON grid_jobs (instance, completed_at) WHERE dedup;
    """,
    # version 5: the replicated strategy applies the scheduling core
    # (buildfleet.scheduler.rules): a lease's id is derived from the job's id and
    # attempts, so it is no longer stored; how long a job may run is fixed when it
    # is submitted (`run_limit`) and its `deadline` set whenever a lease starts; a
    # job a bot failed is kept from that bot until `retry_at`.  Lookups by action go
    # through the unique index of the jobs in flight, so the index of every job by
    # action (which each update of a job had to maintain) goes.
    """
    ALTER TABLE grid_jobs ADD COLUMN run_limit double precision NOT NULL DEFAULT 0;
    ALTER TABLE grid_jobs ADD COLUMN deadline double precision;
    ALTER TABLE grid_jobs ADD COLUMN retry_at double precision;
    UPDATE grid_jobs SET run_limit = (CASE WHEN timeout > 0 THEN timeout ELSE 3600 END) + 30;
    UPDATE grid_jobs SET deadline = started_at + run_limit
        WHERE stage = 3 AND started_at IS NOT NULL;
    DROP INDEX grid_jobs_running;
    ALTER TABLE grid_jobs DROP COLUMN lease_id;
    ALTER TABLE grid_jobs DROP COLUMN started_at;
    CREATE INDEX grid_jobs_deadline ON grid_jobs (instance, deadline) WHERE stage = 3;
    DROP INDEX grid_jobs_action;
    """,
    # version 6: the principal an operation or a bot session belongs to (with
    # authentication configured), in both strategies' tables.
    """
    ALTER TABLE grid_operations ADD COLUMN owner text NOT NULL DEFAULT '';
    ALTER TABLE grid_sessions ADD COLUMN owner text NOT NULL DEFAULT '';
    ALTER TABLE operations ADD COLUMN owner text NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN owner text NOT NULL DEFAULT '';
    """,
    # version 7: drains (bots matching a pattern take no new work), in both
    # strategies' tables: the replicated one reads them on every replica.
    """
    CREATE TABLE drains (
        id text PRIMARY KEY, instance text NOT NULL, pattern text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE TABLE grid_drains (
        instance text NOT NULL, pattern text NOT NULL, created_at double precision NOT NULL,
        PRIMARY KEY (instance, pattern)
    );
    """,
    # version 8: the write-behind store reads done operations back and expires them
    # (embedded/store.py expire_done)
    """
    CREATE INDEX jobs_done ON jobs (instance, completed_at) WHERE stage = 4;
    CREATE INDEX operations_job ON operations (job_id);
    """,
    # version 9: the client's RequestMetadata of an operation (scheduler/rules/
    # invocations.py), in both strategies' tables
    """
    ALTER TABLE operations ADD COLUMN request_metadata bytea NOT NULL DEFAULT '';
    ALTER TABLE grid_operations ADD COLUMN request_metadata bytea NOT NULL DEFAULT '';
    """,
    # version 10: the builds a job counts towards (rules.invocations.build_key of each
    # operation waiting for it), for fair shares between builds; and the queue by
    # build: a row per queued job and build waiting for it, kept by a trigger on
    # every change of a job's stage, builds or priority (scheduler/replicated/bots.py
    # reads it in the fair order)
    """
    ALTER TABLE grid_jobs ADD COLUMN builds text[] NOT NULL DEFAULT '{}';
    CREATE TABLE grid_queue (
        instance text NOT NULL,
        build text NOT NULL,
        priority integer NOT NULL,
        seq bigint NOT NULL,
        job_id text NOT NULL,
        PRIMARY KEY (instance, build, priority, seq, job_id)
    );
    CREATE INDEX grid_queue_job ON grid_queue (job_id);
    CREATE FUNCTION grid_queue_sync() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' AND OLD.stage = 2 AND (TG_OP = 'DELETE' OR NEW.stage <> 2
                OR NEW.builds IS DISTINCT FROM OLD.builds
                OR NEW.priority <> OLD.priority) THEN
            DELETE FROM grid_queue WHERE job_id = OLD.id;
        END IF;
        IF TG_OP <> 'DELETE' AND NEW.stage = 2 AND (TG_OP = 'INSERT' OR OLD.stage <> 2
                OR NEW.builds IS DISTINCT FROM OLD.builds
                OR NEW.priority <> OLD.priority) THEN
            INSERT INTO grid_queue (instance, build, priority, seq, job_id)
            SELECT NEW.instance, b, NEW.priority, NEW.seq, NEW.id
            FROM unnest(CASE WHEN cardinality(NEW.builds) = 0 THEN ARRAY['']::text[]
                        ELSE NEW.builds END) AS b
            ON CONFLICT DO NOTHING;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER grid_queue_sync AFTER INSERT OR DELETE OR UPDATE OF stage, builds, priority
        ON grid_jobs FOR EACH ROW EXECUTE FUNCTION grid_queue_sync();
    INSERT INTO grid_queue (instance, build, priority, seq, job_id)
        SELECT instance, '', priority, seq, id FROM grid_jobs WHERE stage = 2;
    """,
]
