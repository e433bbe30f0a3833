"""api/store.py: the alembic migrations build exactly the ORM's schema and upgrade an old store in place; API keys
are stored hashed, revocable, and a bad database URL is a user error that hides the password."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from api.store import (
    MIGRATIONS,
    Base,
    create_key,
    key_owner,
    list_keys,
    make_engine,
    open_store,
    revoke_key,
)
from flm.config import FLMConfigError


def test_migrations_build_the_orm_schema(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    engine = sessions.kw["bind"]
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0003"
    assert set(inspect(engine).get_table_names()) == {"alembic_version", "api_keys", "jobs", "deployments"}
    open_store(f"sqlite:///{tmp_path / 'g.db'}")  # idempotent on an up-to-date store


def test_an_old_store_is_upgraded_in_place(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("insert into deployments (id, owner, checkpoint, spec, state, created_at, updated_at) "
                          "values ('m', 'alice', 'runs/x', '{}', 'RUNNING', '2026-01-01', '2026-01-01')"))
    sessions = open_store(url)
    with sessions() as s:
        row = s.execute(text("select id, state, attempt, ray_submission_id from deployments")).one()
    assert tuple(row) == ("m", "RUNNING", 0, None)


def test_keys_are_stored_hashed_and_can_be_revoked(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    key, row = create_key(sessions, "ci", owner="team")
    other, _ = create_key(sessions, "laptop", owner="team")
    assert key.startswith("flm_") and len(key) > 40 and key != other
    assert key_owner(sessions, key) == ("team", False)
    for path in tmp_path.iterdir():  # the database and its WAL
        assert key.encode() not in path.read_bytes()
    assert [k.prefix for k in list_keys(sessions)] == [key[:10], other[:10]]
    revoke_key(sessions, "ci")
    assert key_owner(sessions, key) == ("team", True)
    assert key_owner(sessions, other) == ("team", False)
    revoke_key(sessions, other)  # by value
    assert key_owner(sessions, other) == ("team", True)
    assert key_owner(sessions, "flm_never-issued") == (None, False)


def test_revoking_needs_one_matching_key(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    create_key(sessions, "dup")
    _, second = create_key(sessions, "dup")
    with pytest.raises(FLMConfigError, match="2 keys are named 'dup'; name one by its id"):
        revoke_key(sessions, "dup")
    assert revoke_key(sessions, str(second.id)).revoked_at is not None
    with pytest.raises(FLMConfigError, match="no API key with id, name or value 'nobody'"):
        revoke_key(sessions, "nobody")
    with pytest.raises(FLMConfigError, match="--name: give the key a non-empty name"):
        create_key(sessions, " ")


def test_unusable_database_url_is_a_user_error_without_its_password():
    with pytest.raises(FLMConfigError, match="FLM_DATABASE_URL: cannot open the store") as err:
        open_store("postgresql+psycopg://flm:s3cret@127.0.0.1:9/flm")
    assert "s3cret" not in str(err.value) and "127.0.0.1:9/flm" in str(err.value)
