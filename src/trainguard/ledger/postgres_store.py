"""The shared ledger: a PostgreSQL database that every node of a cluster reaches.

The records live off the training hosts, so an insider who controls a host
can add records but, without the database's rights, not rewrite the past;
grant the training role INSERT and SELECT only.  Appends are single-row
INSERTs in autocommit (one transaction each); two writers racing on one
stream collide on the primary key and the loser retries on the new head.
Tables are created on first use, under an advisory lock so that many ranks
starting at once do not race on CREATE TABLE.  A ``postgresql://`` URL may
pick a schema with libpq's ``options=-csearch_path=NAME``.  Appends commit
with ``synchronous_commit=off`` unless the URL's options set it (see
:meth:`PostgresLedger._connect`).  Every record gets the server's own time
(``server_time``, set by a trigger, so no INSERT can choose it): the verifier
holds the steps' claimed durations to it (docs/ledger.md).

psycopg is imported here only, so the rest of trainguard works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from trainguard.errors import MissingExtraError
from trainguard.ledger.chain import LedgerError
from trainguard.ledger.outage import OutageBuffer
from trainguard.ledger.store import SQL_INSERT, SqlLedger

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 10
# An arbitrary constant: the advisory lock that serialises creating the tables.
_SCHEMA_LOCK = 0x7467_6C65_6467_6572 & 0x7FFF_FFFF_FFFF_FFFF

_SCHEMA = (
    """CREATE TABLE trainguard_ledger_records (
        run_id TEXT NOT NULL,
        stream BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        step BIGINT,
        wall_time DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL,
        prev TEXT NOT NULL,
        digest TEXT NOT NULL,
        server_time TIMESTAMPTZ DEFAULT clock_timestamp(),
        PRIMARY KEY (run_id, stream, seq)
    )""",
    """CREATE TABLE trainguard_ledger_streams (
        run_id TEXT NOT NULL,
        stream BIGINT NOT NULL,
        PRIMARY KEY (run_id, stream)
    )""",
    """CREATE OR REPLACE FUNCTION trainguard_ledger_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the trainguard ledger is append-only'; END $$""",
    """CREATE TRIGGER trainguard_ledger_no_change
        BEFORE UPDATE OR DELETE ON trainguard_ledger_records
        FOR EACH ROW EXECUTE FUNCTION trainguard_ledger_append_only()""",
    """CREATE TRIGGER trainguard_ledger_no_truncate
        BEFORE TRUNCATE ON trainguard_ledger_records
        FOR EACH STATEMENT EXECUTE FUNCTION trainguard_ledger_append_only()""",
)
# The server's own time on every record, whatever the INSERT says: a client that names
# the column gets it overwritten (the default alone would take its value).  Tables made
# before the column get it on first use by a role that may alter them; their older rows
# keep NULL (unknown), not the time of the migration.
_SERVER_TIME = (
    "ALTER TABLE trainguard_ledger_records ADD COLUMN IF NOT EXISTS server_time TIMESTAMPTZ",
    "ALTER TABLE trainguard_ledger_records ALTER COLUMN server_time SET DEFAULT clock_timestamp()",
    """CREATE OR REPLACE FUNCTION trainguard_ledger_stamp() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN NEW.server_time := clock_timestamp(); RETURN NEW; END $$""",
    "DROP TRIGGER IF EXISTS trainguard_ledger_server_time ON trainguard_ledger_records",
    """CREATE TRIGGER trainguard_ledger_server_time
        BEFORE INSERT ON trainguard_ledger_records
        FOR EACH ROW EXECUTE FUNCTION trainguard_ledger_stamp()""",
)
SQL_HAS_SERVER_TIME = (
    "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('trainguard_ledger_records') "
    "AND attname = 'server_time' AND NOT attisdropped"
)
# Seconds since the epoch, as a double (EXTRACT gives numeric from PostgreSQL 14 on).
SERVER_TIME_COLUMN = ", EXTRACT(EPOCH FROM server_time)::float8"
SQL_ADD_STREAM = (
    "INSERT INTO trainguard_ledger_streams (run_id, stream) VALUES (%s, %s) ON CONFLICT DO NOTHING"
)


def redact_url(url: str) -> str:
    """The URL without its password and query (which may carry one), for messages."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
    except ValueError:
        return "postgresql://(unparsable URL)"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise MissingExtraError("psycopg", "postgres", "A PostgreSQL ledger") from None
    return psycopg


class PostgresLedger(OutageBuffer, SqlLedger):
    """A ledger on a PostgreSQL server; appends ride out a server restart (see outage.py)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        super().__init__(redact_url(url))
        self._buffer_init()
        self._pg = _psycopg()
        self._url = url
        self._create = create
        self._conn: psycopg.Connection[Any] | None = None
        self._server_time = False  # whether the table has the column (known once connected)

    def _fail(self, what: str, exc: Exception) -> LedgerError:
        if isinstance(exc, self._pg.OperationalError):
            self._broken()
        # libpq's first line says what went wrong; it never quotes the password.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return LedgerError(f"{self.location}: {what}: {reason}")

    def _connect(self) -> None:
        pg = self._pg
        try:
            params = pg.conninfo.conninfo_to_dict(self._url)
        except pg.ProgrammingError:
            raise LedgerError(f"{self.location}: not a valid PostgreSQL URL") from None
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        try:
            conn = pg.connect(autocommit=True, **params)
        except pg.Error as exc:
            raise self._fail("cannot connect", exc) from None
        try:
            if "synchronous_commit" not in str(params.get("options", "")):
                # Like SQLite's synchronous=NORMAL: a killed client loses nothing, a
                # crashed server may lose its last moments of commits (never the
                # consistency); a flush per append costs some 20x the throughput.
                conn.execute("SET synchronous_commit = off")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                row = conn.execute("SELECT to_regclass('trainguard_ledger_records')").fetchone()
                exists = row is not None and row[0] is not None
                if not exists and not self._create:
                    raise LedgerError(f"{self.location}: not a trainguard ledger")
                if not exists:
                    for sql in (*_SCHEMA, *_SERVER_TIME):
                        conn.execute(sql)
                has_column = bool(conn.execute(SQL_HAS_SERVER_TIME).fetchall())
                if not has_column and self._create:
                    has_column = self._add_server_time(conn)
            self._server_time = has_column
        except pg.Error as exc:
            conn.close()
            raise self._fail("cannot set up the ledger", exc) from None
        except LedgerError:
            conn.close()
            raise
        self._conn = conn

    def _add_server_time(self, conn: psycopg.Connection[Any]) -> bool:
        """Add the server-time column to a table made before it; False when this role
        may not (a training role with INSERT and SELECT only): records then carry none."""
        try:
            with conn.transaction():  # a savepoint: a refusal leaves the set-up usable
                for sql in _SERVER_TIME:
                    conn.execute(sql)
        except self._pg.errors.InsufficientPrivilege:
            return False
        return True

    def _extra_columns(self) -> str:
        with self._lock:
            self._ready()
            return SERVER_TIME_COLUMN if self._server_time else ""

    def close(self) -> None:
        with self._lock:
            try:
                if not self._closed:
                    self._drain()  # records queued during an outage: written, or an error
            finally:
                super().close()

    def _disconnect(self, *, inherited: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not inherited:
            try:
                conn.close()
            except self._pg.Error:
                pass

    def _connection(self) -> psycopg.Connection[Any]:
        assert self._conn is not None, "used before _ready()"
        return self._conn

    def _query(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        try:
            rows: list[Sequence[Any]] = (
                self._connection().execute(sql.replace("?", "%s"), params).fetchall()
            )
        except self._pg.Error as exc:
            raise self._fail("cannot read the ledger", exc) from None
        return rows

    def _insert(self, row: Sequence[Any], new_stream: bool) -> bool:
        conn = self._connection()
        insert = SQL_INSERT.replace("?", "%s")
        try:
            if new_stream:
                with conn.transaction():
                    conn.execute(insert, row)
                    conn.execute(SQL_ADD_STREAM, (row[0], row[1]))
            else:
                conn.execute(insert, row)
        except self._pg.errors.UniqueViolation:
            return False
        except self._pg.Error as exc:
            raise self._fail("cannot append to the ledger", exc) from None
        return True
