"""api/store.py on SQLite and on a real PostgreSQL server (tests/conftest.py's `postgres`; skipped, saying why,
where there is none): the alembic migrations build exactly the ORM's schema, upgrade an old store in place and go
down and up again; API keys are stored hashed, revocable; what PostgreSQL refuses and SQLite takes (long names,
NUL bytes, ids past 32 bits) is a user error or stored cleaned, never a driver's error; concurrent writers
compare-and-set a job's state with one winner; and a bad database URL is a user error that hides the password."""

import multiprocessing
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from api.jobs import JobRunner
from api.settings import GatewaySettings
from api.store import (
    MIGRATIONS,
    NAME_CHARS,
    Base,
    Job,
    create_key,
    key_owner,
    list_keys,
    make_engine,
    open_store,
    revoke_key,
    utcnow,
)
from flm.config import FLMConfigError

TABLES = {"alembic_version", "api_keys", "jobs", "deployments"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The URL of a new, empty database: a SQLite file, or a database of the session's PostgreSQL server."""
    return f"sqlite:///{tmp_path / 'g.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres")()


def alembic(engine, verb: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)


def test_migrations_build_the_orm_schema(store_url):
    sessions = open_store(store_url)
    engine = sessions.kw["bind"]
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0003"
    assert set(inspect(engine).get_table_names()) == TABLES
    open_store(store_url)  # idempotent on an up-to-date store


def test_migrations_go_down_to_nothing_and_up_again(store_url):
    engine = open_store(store_url).kw["bind"]
    alembic(engine, "downgrade", "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    alembic(engine, "upgrade", "head")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert set(inspect(engine).get_table_names()) == TABLES
    key, _ = create_key(open_store(store_url), "after")  # and the store works
    assert key_owner(open_store(store_url), key) == ("after", False)


def _open(url: str, barrier) -> None:
    barrier.wait()
    open_store(url)


def test_processes_opening_a_new_store_together_all_succeed(store_url):
    """The gateway and `flm keys create` (or two gateways) starting on one new database: each migrates it, in
    turn. Forked processes (alembic's context is global to a process), with what the test imported already."""
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(3)
    procs = [fork.Process(target=_open, args=(store_url, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert set(inspect(make_engine(store_url)).get_table_names()) == TABLES


def test_an_old_store_is_upgraded_in_place(store_url):
    engine = make_engine(store_url)
    alembic(engine, "upgrade", "0001")
    with engine.begin() as conn:
        conn.execute(text("insert into deployments (id, owner, checkpoint, spec, state, created_at, updated_at) "
                          "values ('m', 'alice', 'runs/x', '{}', 'RUNNING', '2026-01-01', '2026-01-01')"))
    sessions = open_store(store_url)
    with sessions() as s:
        row = s.execute(text("select id, state, attempt, ray_submission_id from deployments")).one()
    assert tuple(row) == ("m", "RUNNING", 0, None)


def test_keys_are_stored_hashed_and_can_be_revoked(store_url, tmp_path):
    sessions = open_store(store_url)
    key, row = create_key(sessions, "ci", owner="team")
    other, _ = create_key(sessions, "laptop", owner="team")
    assert key.startswith("flm_") and len(key) > 40 and key != other
    assert key_owner(sessions, key) == ("team", False)
    with sessions() as s:
        assert key not in str(s.execute(text("select * from api_keys")).all())
    for path in tmp_path.iterdir():  # SQLite's database and its WAL
        assert key.encode() not in path.read_bytes()
    assert [k.prefix for k in list_keys(sessions)] == [key[:10], other[:10]]
    revoke_key(sessions, "ci")
    assert key_owner(sessions, key) == ("team", True)
    assert key_owner(sessions, other) == ("team", False)
    revoke_key(sessions, other)  # by value
    assert key_owner(sessions, other) == ("team", True)
    assert key_owner(sessions, "flm_never-issued") == (None, False)


def test_revoking_needs_one_matching_key(store_url):
    sessions = open_store(store_url)
    create_key(sessions, "dup")
    _, second = create_key(sessions, "dup")
    with pytest.raises(FLMConfigError, match="2 keys are named 'dup'; name one by its id"):
        revoke_key(sessions, "dup")
    assert revoke_key(sessions, str(second.id)).revoked_at is not None
    with pytest.raises(FLMConfigError, match="no API key with id, name or value 'nobody'"):
        revoke_key(sessions, "nobody")
    with pytest.raises(FLMConfigError, match="--name: give the key a non-empty name"):
        create_key(sessions, " ")


def test_what_postgresql_refuses_never_reaches_it(store_url, tmp_path):
    """A key name over its VARCHAR(128) or with a NUL byte, a key id past 32 bits: PostgreSQL raises a driver error
    where SQLite stores or overflows; here each is a user error, the same on both."""
    sessions = open_store(store_url)
    create_key(sessions, "n" * NAME_CHARS)
    with pytest.raises(FLMConfigError, match=f"--name: 129 characters; give at most {NAME_CHARS}"):
        create_key(sessions, "n" * (NAME_CHARS + 1))
    with pytest.raises(FLMConfigError, match="--owner: 'a.*b' has control characters"):
        create_key(sessions, "ok", owner="a\x00b")
    for ident in ("2147483648", "9" * 30, "a\x00b", "\u00b2"):  # past int4, past int8, a NUL, a digit int() refuses
        with pytest.raises(FLMConfigError, match="no API key with id, name or value"):
            revoke_key(sessions, ident)
    assert [k.name for k in list_keys(sessions)] == ["n" * NAME_CHARS]


def test_a_job_state_is_compared_and_set_with_one_winner(store_url, tmp_path):
    """The reconciler and requests move a job's state by compare-and-set (JobRunner.set_state): of writers that
    race from one state, exactly one wins. Ray's message is stored even with a NUL byte in it, and the time
    comes back as written (naive UTC, to the microsecond)."""
    sessions = open_store(store_url)
    created = utcnow()
    with sessions.begin() as s:
        s.add(Job(id="job-0000000001", owner="alice", kind="train", spec={}, state="QUEUED", attempt=0,
                  created_at=created, updated_at=created))
    runner = JobRunner(GatewaySettings(home=tmp_path, database_url=store_url), sessions)
    job = runner.sessions().get(Job, "job-0000000001")
    barrier, won = threading.Barrier(6), []

    def race(i: int):
        barrier.wait()
        if runner.set_state(job, "QUEUED", state="FAILED", error=f"writer {i}: a\x00b"):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    with sessions() as s:
        row = s.execute(select(Job.state, Job.error, Job.created_at)).one()
    assert tuple(row) == ("FAILED", f"writer {won[0]}: a\ufffdb", created)


def test_unusable_database_url_is_a_user_error_without_its_password():
    with pytest.raises(FLMConfigError, match="FLM_DATABASE_URL: cannot open the store") as err:
        open_store("postgresql+psycopg://flm:s3cret@127.0.0.1:9/flm")
    assert "s3cret" not in str(err.value) and "127.0.0.1:9/flm" in str(err.value)


def test_a_sql_ascii_database_works_and_keeps_text_as_sent(postgres):
    """A database created SQL_ASCII (a server initialised without a locale, as in a bare container) opens, and a
    name outside ASCII comes back as written: the store talks UTF-8 to it (without that, psycopg got bytes and
    opening the store failed in SQLAlchemy's version check)."""
    sessions = open_store(postgres("SQL_ASCII"))
    with sessions() as s:
        assert s.execute(text("SHOW server_encoding")).scalar() == "SQL_ASCII"
    _, row = create_key(sessions, "équipe-東京")
    assert [k.name for k in list_keys(sessions)] == ["équipe-東京"] and row.name == "équipe-東京"
