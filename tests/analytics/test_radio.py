"""Radio coverage (analytics/radio.py) over a simulated fleet stored through the real pipeline: LwM2M
meters reporting object 4 in SenML, NB smoke detectors reporting RSRP as vendor analog 0x80, CJ/T 188
meters with no radio, an inactive meter.  Every figure is held equal to a plain-SQL recomputation
(DISTINCT ON for the latest figure, percentile_cont for the distribution) written apart from the code."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import decoders
from analytics.health import uplink_success
from analytics.radio import coverage_groups, device_radio, radio_report, radio_summary, weak_devices
from decoders.gb26875_layout import ANALOG_VALUE
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from simulators.nbiot import RadioSite

NOW = datetime.now(UTC).replace(microsecond=0)
SINCE, UNTIL = NOW - timedelta(days=4), NOW
SITES = [("Yingtan", "信江小区", "good"), ("Yingtan", "龙虎山地下车库", "deep"), ("Nanchang", "红谷滩小区", "fair"),
         ("Nanchang", "青山湖小区", "poor"), ("Jiujiang", "浔阳小区", "fair")]
LWM2M, SMOKE, CJT188 = "lwm2m-3424-water-senml-json", "gb26875-nb-smoke", "cjt188-nb-water-std"
OLD_ONLY = "869200000009998"              # its only radio reading is before the window
INACTIVE = "869200000009999"


def _senml(fix, flow: float, at: datetime) -> bytes:
    records = [("/3424/0/1", flow), ("/4/0/2", fix.rsrp_dbm), ("/4/0/8", fix.cell_id), ("/4/0/11", fix.sinr_db),
               ("/4/0/13", fix.ecl + 1)]        # OMA CE level: 1..3 for ECL 0..2
    return decoders.encode("senml-json", {"records": [{"name": n, "value": float(v), "time": at} for n, v in records]})


def _smoke(rsrp: float, serial: int, at: datetime) -> bytes:
    objects = [{"system_type": 1, "system_address": 0, "component_type": 0x28, "component_address": 4242,
                "time": at, "analog_type": kind, "raw": raw} for kind, raw in ((0x80, round(rsrp)), (0x88, 3000))]
    return decoders.encode("gb26875", {"serial": serial, "version": "2.255", "sent_at": at, "source_address": 9,
                                       "command": 2, "app_type": ANALOG_VALUE, "objects": objects,
                                       "with_description": False})


def _fleet() -> tuple[list[DeviceRecord], list[Uplink]]:
    rng = random.Random(13)
    records, uplinks = [], []
    n = 0

    def device(model: str, city: str, site: str, **kw) -> str:
        nonlocal n
        n += 1
        device_id = kw.pop("device_id", f"8692000000{n:05d}")
        records.append(DeviceRecord(device_id=device_id, model=model, city=city, site_kind="residential",
                                    site_name=site, installed_at=NOW - timedelta(days=10), **kw))
        return device_id

    def up(device_id: str, payload: bytes, at: datetime) -> None:
        uplinks.append(Uplink(device_id=device_id, payload=payload, transport="coap", received_at=at.timestamp()))

    for s, (city, site, coverage) in enumerate(SITES):
        def cell(k: int) -> random.Random:          # two cells serve each site (as the engine draws a site's cell)
            return random.Random(f"site{s}:cell{k % 2}")
        for k in range(6):
            meter = device(LWM2M, city, site)
            place = RadioSite.place(coverage, cell(k), rng)
            for day in range(3):                # a reading a day in the window, the last one latest
                at = NOW - timedelta(days=day, minutes=rng.randrange(10, 600))
                up(meter, _senml(place.fix(rng), 10 + day, at), at)
        for k in range(2):
            smoke = device(SMOKE, city, site)
            place = RadioSite.place(coverage, cell(k), rng)
            for day in range(2):
                at = NOW - timedelta(days=day, minutes=rng.randrange(10, 600))
                up(smoke, _smoke(place.fix(rng).rsrp_dbm, 2 * day, at), at)
        for k in range(2):
            meter = device(CJT188, city, site)
            at = NOW - timedelta(minutes=rng.randrange(10, 600))
            up(meter, decoders.encode("cjt188", {"meter_address": meter[-14:], "flow_m3": 1.0, "meter_time": at}), at)
    # before the window: a fine reading of a weak meter, and a meter heard only then
    first = records[SITES.index(("Yingtan", "龙虎山地下车库", "deep")) * 10].device_id
    old = NOW - timedelta(days=5)
    fine = RadioSite("good", -70.0, 1, 1).fix(random.Random(1))
    up(first, _senml(fine, 1.0, old), old)
    device(LWM2M, "Yingtan", "信江小区", device_id=OLD_ONLY)
    up(OLD_ONLY, _senml(fine, 1.0, old), old)
    device(LWM2M, "Yingtan", "信江小区", device_id=INACTIVE, status="inactive")
    up(INACTIVE, _senml(RadioSite("deep", -125.0, 2, 2).fix(random.Random(2)), 1.0, NOW - timedelta(hours=1)),
       NOW - timedelta(hours=1))
    return records, uplinks


@pytest.fixture(scope="module")
def fleet(pg_admin_url, template_db):
    from tests.conftest import fresh_database

    gen = fresh_database(pg_admin_url, template_db)
    db_url = next(gen)
    records, uplinks = _fleet()
    with psycopg.connect(db_url) as conn:
        register_devices(conn, records)
    registry, writer = DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url))
    try:
        pipeline = Pipeline(registry, writer)
        pipeline.process(uplinks)
        assert pipeline.counters["stored"] == len(uplinks), dict(pipeline.counters)
    finally:
        writer.close()
        registry.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn
    gen.close()


# The reference: each figure's latest value per active device in the window, then plain SQL aggregates.
_REFERENCE = """
    WITH w AS (SELECT * FROM radio_readings WHERE time >= %(s)s AND time < %(u)s),
    rsrp AS (SELECT DISTINCT ON (device_id) device_id, rsrp_dbm FROM w WHERE rsrp_dbm IS NOT NULL
             ORDER BY device_id, time DESC),
    sinr AS (SELECT DISTINCT ON (device_id) device_id, sinr_db FROM w WHERE sinr_db IS NOT NULL
             ORDER BY device_id, time DESC),
    ecl AS (SELECT DISTINCT ON (device_id) device_id, ecl FROM w WHERE ecl IS NOT NULL ORDER BY device_id, time DESC),
    cell AS (SELECT DISTINCT ON (device_id) device_id, cell_id FROM w WHERE cell_id IS NOT NULL
             ORDER BY device_id, time DESC),
    dev AS (SELECT d.device_id, coalesce(s.city_code, 0) AS city, d.site_id, rsrp.rsrp_dbm, sinr.sinr_db, ecl.ecl,
                   cell.cell_id, (rsrp.rsrp_dbm IS NOT NULL OR sinr.sinr_db IS NOT NULL) AS radio
            FROM devices d LEFT JOIN sites s USING (site_id) LEFT JOIN rsrp USING (device_id)
            LEFT JOIN sinr USING (device_id) LEFT JOIN ecl USING (device_id) LEFT JOIN cell USING (device_id)
            WHERE d.status = 'active')
    SELECT {key},
           count(*) FILTER (WHERE radio) AS with_radio, count(*) FILTER (WHERE NOT radio) AS without_radio,
           percentile_cont(ARRAY[0.1, 0.5, 0.9]) WITHIN GROUP (ORDER BY rsrp_dbm) AS rsrp,
           percentile_cont(ARRAY[0.1, 0.5, 0.9]) WITHIN GROUP (ORDER BY sinr_db) AS sinr,
           count(ecl) AS with_ecl, count(*) FILTER (WHERE ecl = 0) AS e0, count(*) FILTER (WHERE ecl = 1) AS e1,
           count(*) FILTER (WHERE ecl = 2) AS e2,
           count(*) FILTER (WHERE radio AND coalesce(rsrp_dbm >= %(r)s, true) AND coalesce(sinr_db >= %(q)s, true))
               AS covered
    FROM dev {where} GROUP BY {group}"""


def _reference(conn, key: str, rsrp_min: float, sinr_min: float, where: str = "", group: str | None = None) -> dict:
    out = {}
    sql = _REFERENCE.format(key=key, where=where, group=group or key)
    for row in conn.execute(sql, {"s": SINCE, "u": UNTIL, "r": rsrp_min, "q": sinr_min}):
        *k, with_radio, without, rsrp, sinr, with_ecl, e0, e1, e2, covered = row
        out[tuple(k)] = {
            "with_radio": with_radio, "without_radio": without, "rsrp": tuple(rsrp or (None,) * 3),
            "sinr": tuple(sinr or (None,) * 3), "with_ecl": with_ecl,
            "ecl_share": tuple(e / with_ecl if with_ecl else None for e in (e0, e1, e2)),
            "covered": covered, "weak": with_radio - covered,
            "coverage_rate": covered / with_radio if with_radio else None}
    return out


def _got(group, cell: bool = False) -> dict:
    return {"with_radio": group.with_radio, "without_radio": group.without_radio,
            "rsrp": (group.rsrp_p10, group.rsrp_p50, group.rsrp_p90),
            "sinr": (group.sinr_p10, group.sinr_p50, group.sinr_p90), "with_ecl": group.with_ecl,
            "ecl_share": group.ecl_share, "covered": group.covered, "weak": group.weak,
            "coverage_rate": group.coverage_rate}


def _approx(d: dict) -> dict:
    return {k: (tuple(pytest.approx(x) if isinstance(x, float) else x for x in v) if isinstance(v, tuple)
                else pytest.approx(v) if isinstance(v, float) else v) for k, v in d.items()}


@pytest.mark.parametrize("rsrp_min, sinr_min", [(-105.0, -3.0), (-95.0, 5.0), (-125.0, -10.0)])
def test_groups_equal_a_plain_sql_recomputation(fleet, rsrp_min, sinr_min):
    report = radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=rsrp_min, sinr_min_db=sinr_min)
    want_city = _reference(fleet, "city", rsrp_min, sinr_min)
    assert {(g.city_code,): _got(g) for g in report.level("city")} == {k: _approx(v) for k, v in want_city.items()}
    want_site = _reference(fleet, "city, site_id", rsrp_min, sinr_min)
    assert {(g.city_code, g.site_id): _got(g) for g in report.level("site")} == {
        k: _approx(v) for k, v in want_site.items()}
    want_cell = _reference(fleet, "city, cell_id", rsrp_min, sinr_min, "WHERE cell_id IS NOT NULL")
    got_cell = {(g.city_code, g.cell_id): _got(g) for g in report.level("cell")}
    for v in want_cell.values():
        v["without_radio"] = None                     # a device without radio has no cell
    assert got_cell == {k: _approx(v) for k, v in want_cell.items()}
    province = _reference(fleet, "'all'", rsrp_min, sinr_min, group="()")[("all",)]
    assert _got(report.level("province")[0]) == _approx(province)


def test_the_story_the_figures_tell(fleet):
    report = radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=-105.0, sinr_min_db=-3.0)
    province = report.level("province")[0]
    # 5 sites × (6 LwM2M + 2 smoke) with radio; 5 × 2 CJ/T 188 and the meter heard only before: without
    assert (province.with_radio, province.without_radio) == (40, 11)
    sites = {g.site_name: g for g in report.level("site")}
    assert sites["信江小区"].coverage_rate == 1.0 and sites["龙虎山地下车库"].coverage_rate == 0.0
    assert sites["龙虎山地下车库"].ecl_share[2] > 0.5               # deep coverage: mostly ECL 2
    assert {g.cell_id for g in report.level("cell")} == {
        g for (g,) in fleet.execute("SELECT DISTINCT cell_id FROM radio_readings WHERE cell_id IS NOT NULL "
                                    "AND time >= %s AND device_id <> %s", (SINCE, INACTIVE))}


def test_weak_devices_equal_sql_and_carry_uplink_success(fleet):
    report = radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=-105.0, sinr_min_db=-3.0)
    want = {d for (d,) in fleet.execute("""
        WITH w AS (SELECT * FROM radio_readings WHERE time >= %(s)s AND time < %(u)s),
        r AS (SELECT DISTINCT ON (device_id) device_id, rsrp_dbm FROM w WHERE rsrp_dbm IS NOT NULL
              ORDER BY device_id, time DESC),
        q AS (SELECT DISTINCT ON (device_id) device_id, sinr_db FROM w WHERE sinr_db IS NOT NULL
              ORDER BY device_id, time DESC)
        SELECT device_id FROM devices d LEFT JOIN r USING (device_id) LEFT JOIN q USING (device_id)
        WHERE d.status = 'active' AND (r.rsrp_dbm < -105 OR q.sinr_db < -3)""", {"s": SINCE, "u": UNTIL})}
    assert {w.device_id for w in report.weak} == want and want
    rsrp = [w.rsrp_dbm for w in report.weak if w.rsrp_dbm is not None]
    assert rsrp == sorted(rsrp)                                        # weakest first
    success = {u.device_id: u.success for u in uplink_success(fleet, SINCE, UNTIL)}
    assert all(w.success == success[w.device_id] for w in report.weak)
    assert {u.device_id for u in report.success} == set(success)
    for w in report.weak:
        assert w.reason == "+".join(r for r, bad in (("rsrp", w.rsrp_dbm is not None and w.rsrp_dbm < -105),
                                                     ("sinr", w.sinr_db is not None and w.sinr_db < -3)) if bad)


def test_a_device_without_radio_is_never_weak(fleet):
    report = radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=-44.0, sinr_min_db=40.0)    # everyone with radio fails
    no_radio = {d for (d,) in fleet.execute("SELECT device_id FROM devices WHERE model = %s", (CJT188,))}
    weak = {w.device_id for w in report.weak}
    assert weak and not weak & no_radio and OLD_ONLY not in weak and INACTIVE not in weak
    assert report.level("province")[0].weak == report.level("province")[0].with_radio == len(weak)


def test_readings_outside_the_window_do_not_count(fleet):
    devices = {d.device_id: d for d in device_radio(fleet, SINCE, UNTIL)}
    assert not devices[OLD_ONLY].with_radio and INACTIVE not in devices
    earlier = {d.device_id: d for d in device_radio(fleet, NOW - timedelta(days=6), UNTIL)}
    stored = fleet.execute("SELECT rsrp_dbm FROM radio_readings WHERE device_id = %s", (OLD_ONLY,)).fetchone()[0]
    assert earlier[OLD_ONLY].with_radio and earlier[OLD_ONLY].rsrp_dbm == stored


def test_one_city_and_bad_input(fleet):
    report = radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=-105.0, sinr_min_db=-3.0, city="Nanchang")
    assert {g.city_code for g in report.groups if g.level != "province"} == {360100}
    with pytest.raises(ValueError, match="unknown city"):
        radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=-105.0, sinr_min_db=-3.0, city="Atlantis")
    with pytest.raises(ValueError, match="must be after"):
        radio_report(fleet, UNTIL, SINCE, rsrp_min_dbm=-105.0, sinr_min_db=-3.0)
    with pytest.raises(ValueError, match="level must be one of"):
        report.level("street")


def test_pure_grouping_without_devices():
    groups = coverage_groups([], {}, rsrp_min_dbm=-105.0, sinr_min_db=-3.0)
    assert len(groups) == 1 and groups[0].coverage_rate is None and groups[0].rsrp_p50 is None
    assert weak_devices([], [], rsrp_min_dbm=-105.0, sinr_min_db=-3.0) == []


def test_report_radio_prints_tables_and_csv(fleet, monkeypatch):
    from typer.testing import CliRunner

    from iotjx.cli import app
    from iotjx.settings import get_settings

    monkeypatch.setenv("IOTJX_DATABASE_URL", fleet.info.dsn)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        since = SINCE.strftime("%Y-%m-%dT%H:%M:%S")          # naive: UTC
        shown = runner.invoke(app, ["report", "radio", "--since", since], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert "Radio per city" in shown.output and "Weak-coverage devices" in shown.output
        report = radio_report(fleet, SINCE, UNTIL, rsrp_min_dbm=-105.0, sinr_min_db=-3.0)
        weak = runner.invoke(app, ["report", "radio", "--csv", "--section", "weak", "--since", since])
        lines = weak.output.splitlines()
        assert lines[0].startswith("device_id,model,city,site,cell_id,rsrp_dbm,sinr_db,ecl,reason")
        assert [line.split(",")[0] for line in lines[1:]] == [w.device_id for w in report.weak]
        cities = runner.invoke(app, ["report", "radio", "--csv", "--section", "cities", "--since", since]).output
        rows = {r.split(",")[1]: r.split(",") for r in cities.splitlines()[1:]}
        header = cities.splitlines()[0].split(",")
        for g in report.level("province") + report.level("city"):
            assert rows[g.city][header.index("coverage_rate")] == ("" if g.coverage_rate is None
                                                                  else f"{g.coverage_rate:.3f}")
        # thresholds are settings
        monkeypatch.setenv("IOTJX_RADIO_RSRP_MIN_DBM", "-140")
        monkeypatch.setenv("IOTJX_RADIO_SINR_MIN_DB", "-30")
        get_settings.cache_clear()
        none_weak = runner.invoke(app, ["report", "radio", "--csv", "--section", "weak", "--since", since])
        assert none_weak.output.splitlines()[1:] == []
        every = runner.invoke(app, ["report", "radio", "--csv", "--city", "Yingtan"]).output
        assert [line for line in every.splitlines() if line.startswith("# ")] == \
            ["# cities", "# sites", "# cells", "# weak", "# success"]
        zoned = runner.invoke(app, ["report", "radio", "--csv", "--section", "weak", "--since",
                                    (SINCE + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S+08:00")])
        assert zoned.exit_code == 0 and zoned.output == none_weak.output
        assert runner.invoke(app, ["report", "radio", "--since", "last week"]).exit_code == 2
        assert runner.invoke(app, ["report", "radio", "--city", "Atlantis"]).exit_code == 2
        assert runner.invoke(app, ["report", "radio", "--section", "water"]).exit_code == 2
    finally:
        get_settings.cache_clear()


def _same_groups(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for name in x.__dataclass_fields__:
            u, v = getattr(x, name), getattr(y, name)
            if name == "ecl_share":
                assert u == pytest.approx(v, nan_ok=True) if all(s is not None for s in u + v) else u == v, (x, name)
            elif isinstance(u, float) or isinstance(v, float):
                assert u == pytest.approx(v), (x, name)
            else:
                assert u == v, (x, name)


@pytest.mark.parametrize("city", [None, "Nanchang"])
def test_a_window_open_to_now_reads_the_latest_rollup_and_gives_the_same_figures(fleet, city):
    """until=None (now): each device's latest figures come from the writer's all-time rollup_radio_latest;
    they equal those of the closed window [since, now) read from the device-day rollup and the readings,
    and the summary computed in SQL equals the report's groups computed in Python."""
    since = NOW - timedelta(days=4)
    until = datetime.now(UTC) + timedelta(seconds=1)
    latest = device_radio(fleet, since, None, city)
    closed = device_radio(fleet, since, until, city)
    assert latest == closed and any(d.with_radio for d in latest)
    report = radio_report(fleet, since, None, rsrp_min_dbm=-105.0, sinr_min_db=-3.0, city=city)
    summary = radio_summary(fleet, since, rsrp_min_dbm=-105.0, sinr_min_db=-3.0, city=city)
    _same_groups(summary, list(report.groups))
    later = radio_summary(fleet, NOW - timedelta(days=1), rsrp_min_dbm=-105.0, sinr_min_db=-3.0, city=city)
    _same_groups(later, list(radio_report(fleet, NOW - timedelta(days=1), None, rsrp_min_dbm=-105.0,
                                          sinr_min_db=-3.0, city=city).groups))


_LATEST_IN_WINDOW = """
    SELECT d.device_id,
           (SELECT rsrp_dbm FROM radio_readings r WHERE r.device_id = d.device_id AND time >= %(s)s AND time < %(u)s
              AND rsrp_dbm IS NOT NULL ORDER BY time DESC LIMIT 1),
           (SELECT sinr_db FROM radio_readings r WHERE r.device_id = d.device_id AND time >= %(s)s AND time < %(u)s
              AND sinr_db IS NOT NULL ORDER BY time DESC LIMIT 1),
           (SELECT ecl FROM radio_readings r WHERE r.device_id = d.device_id AND time >= %(s)s AND time < %(u)s
              AND ecl IS NOT NULL ORDER BY time DESC LIMIT 1),
           (SELECT cell_id FROM radio_readings r WHERE r.device_id = d.device_id AND time >= %(s)s AND time < %(u)s
              AND cell_id IS NOT NULL ORDER BY time DESC LIMIT 1),
           (SELECT pci FROM radio_readings r WHERE r.device_id = d.device_id AND time >= %(s)s AND time < %(u)s
              AND pci IS NOT NULL ORDER BY time DESC LIMIT 1)
    FROM devices d WHERE d.status = 'active' AND d.installed_at <= %(u)s ORDER BY d.device_id"""


@pytest.mark.parametrize("cut", [None, 0.75, 0.25, "2 days"])
def test_a_closed_window_gives_each_figures_latest_value_in_it(fleet, cut):
    """A closed window is served from the all-time latest rollup for the devices whose figures all lie before
    its end and from the window's rollups and readings for the others (all of them when they are most): per
    device the latest value of each figure in [since, until) equals a plain SQL lookup in radio_readings, with
    and without the rollups.  `until`: now, a quantile of the devices' newest readings, or 2 days ago."""
    since = NOW - timedelta(days=4)
    if cut is None:
        until = datetime.now(UTC) + timedelta(seconds=1)
    elif cut == "2 days":
        until = NOW - timedelta(days=2)
    else:
        until = fleet.execute("""SELECT percentile_disc(%s) WITHIN GROUP (ORDER BY t) + interval '1 microsecond'
                                 FROM (SELECT max(time) AS t FROM radio_readings GROUP BY device_id) x""",
                              (cut,)).fetchone()[0]
    after = fleet.execute("SELECT count(DISTINCT device_id) FROM radio_readings WHERE time >= %s", (until,)).fetchone()[0]
    assert (after > 0) == (cut is not None)
    want = [tuple(r) for r in fleet.execute(_LATEST_IN_WINDOW, {"s": since, "u": until})]
    for rollups in (True, False):
        got = [(d.device_id, d.rsrp_dbm, d.sinr_db, d.ecl, d.cell_id, d.pci)
               for d in device_radio(fleet, since, until, rollups=rollups)]
        assert got == want and any(g[1] is not None for g in got)
