"""The gateway's store: API keys, jobs and deployments in SQLAlchemy 2 tables.

SQLite under `$FLM_HOME/gateway.db` is the embedded default; `FLM_DATABASE_URL` selects any SQLAlchemy URL
(`postgresql+psycopg://user:pw@host/db`, with the `psycopg` driver installed). The schema is owned by the alembic
migrations in `api/migrations/`, applied by `open_store` (the gateway on start, `flm keys` before it writes), so a
store written by an older gateway is upgraded in place and never recreated.

Both databases are tested (tests/api/test_store.py runs on each). What PostgreSQL refuses and SQLite takes is
stopped here, before it reaches the database: a string longer than its VARCHAR (SQLite ignores the length), a
NUL byte in any text (`Message` columns replace it; names and lookups refuse it), an integer beyond the column's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import secrets
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from flm.config import FLMConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
KEY_PREFIX = "flm_"
NAME_CHARS = 128  # a key's name and owner: ApiKey's String(128), which PostgreSQL enforces
MAX_ID = 2**31 - 1  # an Integer column: 32-bit on PostgreSQL
MIGRATION_LOCK = 0x464C4D  # PostgreSQL advisory lock of `migrate` ("FLM"): one gateway migrates, the others wait
OWNER_LOCKS = 0x464C4D  # the first key of `owner_lock`'s two-key advisory locks (a space apart from the one-key)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored naive, always UTC (SQLite has no time zones)


class Message(TypeDecorator):
    """Text from outside (a job's log line, Ray's message): a NUL byte, which PostgreSQL's text cannot hold and
    SQLite's can, is stored as U+FFFD, so a process that printed one cannot fail the reconciler's update."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """A bearer key: only its SHA-256 is stored (keys are 32 random bytes, so a slow hash buys nothing)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str] = mapped_column(String(128), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to tell keys apart in `flm keys list`
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # the key's own caps over the gateway's (api.settings.Limits fields; None = no cap); NULL: the gateway's
    limits: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Job(Base):
    """One submitted job. `id` is also the Ray Train run name (so a resubmission resumes its checkpoints) and the
    first attempt's Ray submission id; attempt n > 1 is submitted as `<id>.r<n>` (Ray never reuses an id)."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    ray_submission_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    error: Mapped[str | None] = mapped_column(Message, nullable=True)


class Deployment(Base):
    """A checkpoint served by Ray Serve as the application `id` (its model name), reached at `url`. It is created
    and deleted by short Ray Jobs (`python -m api.deploy`); `ray_submission_id` is the current one, attempt n of
    any operation on it is submitted as `<id>.op<n>`."""

    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    checkpoint: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Message, nullable=True)
    ray_submission_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


# --- engine and migrations -------------------------------------------------------------------------------------
def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL: readers never wait for the writer; busy_timeout: a second process (flm keys) waits instead of failing
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, never corrupt; commits need no fsync
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {}
    if url.startswith("postgresql+psycopg") and "client_encoding" not in url:
        # a database created SQL_ASCII (initdb without a locale, as a bare container makes it) would otherwise hand
        # psycopg bytes, which SQLAlchemy's first query cannot parse; UTF-8 both ways stores what we send as sent
        connect_args["client_encoding"] = "utf8"
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest alembic revision (idempotent), in one transaction that holds the database's
    write lock: processes that start together on one new database (the gateway and `flm keys create`, two
    gateways) take turns, where both would create the tables and one fail."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # held to the end of this transaction
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        elif conn.dialect.name == "sqlite":  # pysqlite would run the DDL outside any transaction (busy_timeout waits)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextlib.contextmanager
def owner_lock(sessions: sessionmaker[Session], owner: str):
    """Held by one gateway process at a time, of every process on this store, while a quota counts what `owner`
    holds and the row that adds to it is written (commit inside the block): two gateways on one database would
    otherwise both count below the cap and both add. PostgreSQL: an advisory lock per owner, on a connection of
    its own; SQLite: an exclusive flock of `<database>.lock` (its writes take turns anyway)."""
    engine = sessions.kw["bind"]
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = {"space": OWNER_LOCKS, "owner": owner}
            conn.execute(text("SELECT pg_advisory_lock(:space, hashtext(:owner))"), key)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:space, hashtext(:owner))"), key)
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":  # one process: the gateway's own thread lock is enough
        yield
        return
    with open(f"{database}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_store(url: str) -> sessionmaker[Session]:
    """A session factory on a migrated database; a URL SQLAlchemy cannot use is a user error."""
    try:
        engine = make_engine(url)
        migrate(engine)
    except Exception as e:  # driver missing, server down, bad URL: all a configuration problem
        if isinstance(e, FLMConfigError):
            raise
        raise FLMConfigError(f"FLM_DATABASE_URL: cannot open the store at {engine_repr(url)} "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return sessionmaker(engine, expire_on_commit=False)


def engine_repr(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


# --- API keys ----------------------------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_limits(limits: dict | None) -> dict | None:
    """A key's own limits, validated as api.settings.Limits fields (FLMConfigError naming the option)."""
    from pydantic import ValidationError

    from api.settings import Limits

    if not limits:
        return None
    try:
        Limits.model_validate(limits)
    except ValidationError as e:
        err = e.errors()[0]
        raise FLMConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    return dict(limits)


def check_name(option: str, value: str) -> str:
    """A key's name or owner: not empty, at most NAME_CHARS characters, no control characters (PostgreSQL
    refuses a NUL byte and a longer string, SQLite would store either)."""
    if not value.strip():
        raise FLMConfigError(f"{option}: give the key a non-empty {option.removeprefix('--')}")
    if len(value) > NAME_CHARS:
        raise FLMConfigError(f"{option}: {len(value)} characters; give at most {NAME_CHARS}")
    if not value.isprintable():
        raise FLMConfigError(f"{option}: {value!r} has control characters; give a printable one")
    return value


def create_key(sessions: sessionmaker[Session], name: str, owner: str | None = None,
               limits: dict | None = None) -> tuple[str, ApiKey]:
    """A new key for `owner` (default: `name`), with its own `limits` over the gateway's (see api.settings.Limits);
    the plain key is returned once and never stored."""
    check_name("--name", name)
    if owner:
        check_name("--owner", owner)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, owner=owner or name, key_hash=hash_key(key), prefix=key[:10], limits=check_limits(limits))
    with sessions.begin() as s:
        s.add(row)
    return key, row


# The two lookups of every authenticated read, as statements built once: a quarter of the ORM's cost per call.
_KEY = select(ApiKey.id, ApiKey.owner, ApiKey.revoked_at, ApiKey.limits).where(ApiKey.key_hash == bindparam("h"))
_JOB = select(Job.__table__).where(Job.id == bindparam("id"))


def key_row(sessions: sessionmaker[Session], key: str):
    """The key's id, owner, revoked_at and limits (read-only); None for a key never issued."""
    with sessions.kw["bind"].connect() as conn:
        return conn.execute(_KEY, {"h": hash_key(key)}).first()


def key_owner(sessions: sessionmaker[Session], key: str) -> tuple[str | None, bool]:
    """(owner, revoked) of a key; (None, False) for a key never issued."""
    row = key_row(sessions, key)
    return (None, False) if row is None else (row.owner, row.revoked_at is not None)


def get_job(sessions: sessionmaker[Session], job_id: str) -> Job | None:
    """The job's row: its columns as attributes, like a Job, but read-only and without the ORM's bookkeeping
    (which cost a third of a GET /v1/jobs/{id})."""
    with sessions.kw["bind"].connect() as conn:
        return conn.execute(_JOB, {"id": job_id}).first()


def find_key(s: Session, ident: str) -> ApiKey:
    """The one key with this id, value or name. An id past the column's integers, or a name with a NUL byte
    (neither of which a key can have) names no key: never an overflow or a driver's error."""
    rows = list(s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(ident))))
    if not rows and ident.isascii() and ident.isdigit() and int(ident) <= MAX_ID:
        rows = list(s.scalars(select(ApiKey).where(ApiKey.id == int(ident))))
    if not rows and "\x00" not in ident:
        rows = list(s.scalars(select(ApiKey).where(ApiKey.name == ident)))
    if not rows:
        raise FLMConfigError(f"no API key with id, name or value {ident!r}; see `flm keys list`")
    if len(rows) > 1:
        raise FLMConfigError(f"{len(rows)} keys are named {ident!r}; name one by its id (`flm keys list`)")
    return rows[0]


def set_key_limits(sessions: sessionmaker[Session], ident: str, limits: dict) -> ApiKey:
    """Put `limits` (fields of api.settings.Limits; None = no cap) over the key's own; `reset` fields back to
    the gateway's by giving them as the string 'default'."""
    with sessions.begin() as s:
        row = find_key(s, ident)
        merged = {**(row.limits or {}), **limits}
        row.limits = check_limits({k: v for k, v in merged.items() if v != "default"})
    return row


def revoke_key(sessions: sessionmaker[Session], ident: str) -> ApiKey:
    """Revoke by id, by the key itself, or by name (when one key has it)."""
    with sessions.begin() as s:
        row = find_key(s, ident)
        row.revoked_at = row.revoked_at or utcnow()
    return row


def list_keys(sessions: sessionmaker[Session]) -> list[ApiKey]:
    with sessions() as s:
        return list(s.scalars(select(ApiKey).order_by(ApiKey.id)))
