"""The gateway's device registry stays bounded: an LRU of devices, a bounded set of unknown ids, one
settings dict per model; and what it returns is what the devices table says (within its ttl)."""

from __future__ import annotations

import json
import time
import uuid

import psycopg
import pytest

from ingest.registry import DeviceRegistry
from iotjx.model import Device


def _register(db_url: str, n: int, prefix: str = "86") -> list[str]:
    """`n` devices spread round-robin over every model, by COPY; their ids."""
    ids = [f"{prefix}{k:013d}" for k in range(n)]
    with psycopg.connect(db_url) as conn:
        models = conn.execute("SELECT model, pilot FROM device_models ORDER BY model").fetchall()
        with conn.cursor() as cur, cur.copy("COPY devices (device_id, model, pilot, network, "
                                            "reporting_interval_s) FROM STDIN") as copy:
            for k, device_id in enumerate(ids):
                model, pilot = models[k % len(models)]
                copy.write_row((device_id, model, pilot, ("nbiot", "cat1")[k % 2], 600 if k % 3 == 0 else None))
    return ids


def _expected(db_url: str, ids: list[str]) -> dict[str, Device]:
    """The devices as the tables say, computed without the registry's query or its sharing."""
    with psycopg.connect(db_url) as conn:
        models = {r[0]: r for r in conn.execute(
            "SELECT model, codec, pilot, family, settings::text, inner_codec, inner_settings::text, "
            "reporting_interval_s, dedup_window_s, max_payload_bytes FROM device_models")}
        rows = conn.execute("SELECT device_id, model, pilot, network, site_id, reporting_interval_s, status, "
                            "device_key FROM devices WHERE device_id = ANY(%s)", (ids,)).fetchall()
    out = {}
    for device_id, model, pilot, network, site_id, interval, status, device_key in rows:
        _, codec, model_pilot, family, settings, inner, inner_settings, model_interval, dedup, largest = models[model]
        if status == "retired":
            continue
        out[device_id] = Device(device_id=device_id, model=model, codec=codec, pilot=pilot, network=network,
                                site_id=site_id, reporting_interval_s=interval or model_interval, status=status,
                                codec_settings=json.loads(settings), family=family or model_pilot,
                                inner_codec=inner, inner_settings=json.loads(inner_settings), dedup_window_s=dedup,
                                max_payload_bytes=largest, key=device_key)
    return out


def _set_status(db_url: str, device_id: str, status: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE devices SET status = %s WHERE device_id = %s", (status, device_id))


@pytest.fixture
def registry_factory(db_url):
    made: list[DeviceRegistry] = []

    def make(**kwargs) -> DeviceRegistry:
        made.append(DeviceRegistry(lambda: psycopg.connect(db_url), **kwargs))
        return made[-1]

    yield make
    for registry in made:
        registry.close()


def test_cache_stays_within_its_bound_and_answers_like_the_table(db_url, registry_factory):
    ids = _register(db_url, 1_000)
    registry = registry_factory(cache_max=50)
    expected = _expected(db_url, ids)
    for start in range(0, len(ids), 37):
        batch = ids[start:start + 37] + [ids[start // 2]]           # a batch can mix new and older ids
        assert registry.lookup(batch) == {i: expected[i] for i in batch}
        assert len(registry) <= 50
    assert len(registry) == 50
    # A second pass: every device was evicted long ago and is fetched again, unchanged.
    assert registry.lookup(ids) == expected
    assert len(registry) == 50


def test_evicted_device_is_fetched_again_and_recent_ones_stay(db_url, registry_factory):
    ids = _register(db_url, 300)
    registry = registry_factory(cache_max=100)
    hot, cold = ids[0], ids[1]
    registry.lookup([hot, cold])
    for start in range(2, 300, 20):
        registry.lookup(ids[start:start + 20] + [hot])              # `hot` keeps being used, `cold` not
    # Retire both in the table: the cached one is still served (ttl), the evicted one is asked again.
    _set_status(db_url, hot, "retired")
    _set_status(db_url, cold, "retired")
    assert set(registry.lookup([hot, cold])) == {hot}


def test_devices_of_one_model_share_their_settings_dicts(db_url, registry_factory):
    ids = _register(db_url, 200)
    registry = registry_factory(cache_max=1_000)
    first = registry.lookup(ids[:100])
    second = registry.lookup(ids[100:])                             # another fetch, other rows
    by_model: dict[str, list[Device]] = {}
    for device in [*first.values(), *second.values()]:
        by_model.setdefault(device.model, []).append(device)
    assert len(by_model) > 5
    expected = _expected(db_url, ids)
    for devices in by_model.values():
        assert len({id(d.codec_settings) for d in devices}) == 1
        assert len({id(d.inner_settings) for d in devices}) == 1
        assert all(d == expected[d.device_id] for d in devices)
    settings = {id(ds[0].codec_settings): ds[0].codec_settings for ds in by_model.values()}
    distinct = {json.dumps(s, sort_keys=True) for s in settings.values()}
    assert len(settings) == len(distinct)          # equal settings texts share, different ones do not


def test_model_settings_changed_in_the_table_are_seen_after_the_ttl(db_url, registry_factory):
    ids = _register(db_url, 40)
    registry = registry_factory(ttl_s=0.3)
    before = registry.lookup(ids)
    model = before[ids[0]].model
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE device_models SET settings = settings || '{\"marker\": 7}' WHERE model = %s", (model,))
    assert registry.lookup(ids) == before
    time.sleep(0.35)
    after = registry.lookup(ids)
    assert after == _expected(db_url, ids)
    assert after[ids[0]].codec_settings["marker"] == 7
    assert "marker" not in before[ids[0]].codec_settings           # the old dict was not changed in place


def test_registered_and_retired_while_the_gateway_runs(db_url, registry_factory):
    ids = _register(db_url, 10)
    registry = registry_factory(ttl_s=0.4, unknown_ttl_s=0.2)
    newcomer = "869999999999999"
    assert registry.lookup([newcomer, ids[0]]) == _expected(db_url, [ids[0]])
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO devices (device_id, model, pilot, network) "
                     "SELECT %s, model, pilot, 'nbiot' FROM devices WHERE device_id = %s", (newcomer, ids[0]))
    assert registry.lookup([newcomer]) == {}                        # asked again only after unknown_ttl_s
    time.sleep(0.25)
    assert registry.lookup([newcomer]) == _expected(db_url, [newcomer])
    _set_status(db_url, ids[0], "retired")
    assert set(registry.lookup([ids[0]])) == {ids[0]}               # still cached: served until ttl_s
    time.sleep(0.45)
    assert registry.lookup([ids[0], newcomer]) == _expected(db_url, [newcomer])


def test_a_flood_of_unknown_ids_stays_bounded(db_url, registry_factory):
    ids = _register(db_url, 20)
    registry = registry_factory(unknown_max=100, cache_max=1_000)
    for _ in range(30):
        flood = [uuid.uuid4().hex for _ in range(500)]
        assert registry.lookup(flood + ids) == _expected(db_url, ids)
        assert registry.unknown_cached <= 100
        assert len(registry) == 20
    # Expired unknown ids leave even below the bound.
    registry = registry_factory(unknown_ttl_s=0.1)
    registry.lookup([uuid.uuid4().hex for _ in range(50)])
    assert registry.unknown_cached == 50
    time.sleep(0.15)
    registry.lookup([uuid.uuid4().hex])
    assert registry.unknown_cached == 1


def test_refuses_a_bound_below_one(db_url):
    with pytest.raises(ValueError, match="at least 1"):
        DeviceRegistry(lambda: psycopg.connect(db_url), cache_max=0)
