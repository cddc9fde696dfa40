"""Configuration parsing, DSN redaction, payload validation: pure logic, no database."""

from __future__ import annotations

import math

import pytest

from core import DistributedProcessor, InvalidPayload
from core.admin import glob_to_like
from core.dsn import redact, resolve_dsn
from core.enqueue import inserted_blocked
from core.errors import ConfigurationError, InvalidArgument
from core.instance import new_instance_id
from core.queries import Queries, channel_for, raw_statements


def test_redact_hides_passwords_in_urls_and_keyword_dsns() -> None:
    assert redact("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert "s3cret" not in redact("host=db user=bob password=s3cret dbname=x")
    assert "s3cret" not in redact("host=db password='s3 cret' dbname=x")
    assert redact("postgresql://bob@db/x") == "postgresql://bob@db/x"


def test_dsn_falls_back_to_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/d")
    assert resolve_dsn(None) == "postgresql://u@h/d"
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        resolve_dsn(None)


def test_malformed_dsn_is_a_configuration_error_without_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        DistributedProcessor("host=x password=hunter2 bogus_option=1")
    assert "hunter2" not in str(info.value)


def test_constructor_does_not_connect() -> None:
    # Nothing listens on port 1: a connecting constructor would fail here.
    p = DistributedProcessor("host=127.0.0.1 port=1 dbname=x user=x")
    assert p._pool is None
    p.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"batch_size": -5}, {"lease_seconds": 0}, {"pool_min": 5, "pool_max": 2},
     {"schema": "bad;name"}, {"queue": ""}, {"heartbeat_interval": 20, "lease_seconds": 30}],
)
def test_bad_settings_raise_configuration_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        DistributedProcessor("host=127.0.0.1 dbname=x", **kwargs)  # type: ignore[arg-type]


def test_instance_ids_are_unique_per_start() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100


@pytest.mark.parametrize(
    ("payload", "reason"),
    [([1, 2], "expected a dict"), ("text", "expected a dict"), ({"x": {1, 2}}, "not JSON"),
     ({"x": math.nan}, "not JSON"), ({"x": "a\x00b"}, "NUL")],
)
def test_invalid_payloads_name_their_index(payload: object, reason: str) -> None:
    with pytest.raises(InvalidPayload, match=reason) as info:
        DistributedProcessor._serialise([{"ok": 1}, payload])
    assert info.value.index == 1
    assert "index 1" in str(info.value)


def test_glob_translation_escapes_like_wildcards() -> None:
    assert glob_to_like("acct-*") == "acct-%"
    assert glob_to_like("a?c") == "a_c"
    assert glob_to_like("50%_off") == "50\\%\\_off"


def test_channel_names_fit_postgres_identifiers() -> None:
    assert channel_for("public", "default") == "dproc:public:default"
    assert len(channel_for("public", "q" * 200).encode()) <= 63


def test_every_named_statement_composes_for_a_custom_schema() -> None:
    names = raw_statements()
    assert {"claim", "fail", "recover_orphans", "add_records", "heartbeat"} <= set(names)
    q = Queries("tenant_a")
    for name in q.names():
        text = getattr(q, name)
        assert "{" not in text.replace("'{}'", "") or name == "register_instance", name
    assert '"tenant_a"."processing_queue"' in q.claim


def test_invalid_queue_filter_and_batch_size_raise_invalid_argument() -> None:
    p = DistributedProcessor("host=127.0.0.1 port=1 dbname=x")
    with pytest.raises(InvalidArgument):
        p.claim_records(-1)
    with pytest.raises(InvalidArgument):
        p.claim_records(queues=[])
    with pytest.raises(InvalidArgument, match="unknown status"):
        p.get_queue_status(statuses=["pending", "bogus"])
    p.close()


def test_records_of_a_key_are_inserted_blocked_unless_spread_out() -> None:
    # "a" every 3 records (spread, for gap 3) then 2 apart, "b" twice in a row, "c" behind a record it must
    # not follow claimable
    keys = ["a", "b", "b", "a", None, "c", "a", "b", "a", "a"]
    assert inserted_blocked(keys, {"c": None}, gap=3) == [
        False, False, True, False, False, True, False, True, True, True]
    # once one record of a key is blocked, every later one of the batch is too, however far behind
    assert inserted_blocked(["a", "a", None, None, None, "a"], {}, gap=2) == [False, True, False, False, False, True]
    assert inserted_blocked([None, None], {}, gap=1000) == [False, False]
    # behind a claimable record of an earlier batch: by id distance (the batch's ids start at first_id)
    assert inserted_blocked(["a", "b", "a", "b"], {"a": 100, "b": 98}, first_id=101, gap=3) == [
        True, False, True, True]
    assert inserted_blocked(["a", "a"], {"a": 100}, first_id=110, gap=10) == [False, True]
