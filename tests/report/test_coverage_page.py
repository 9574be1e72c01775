"""The HTML coverage report (`GET /reports/coverage`, `iotjx report coverage --html`): its figures are
`/coverage`'s for the same database and day, its radio rows a plain-SQL recount, a city-scoped key sees
its cities only, and the page renders in Debian's headless Chromium with no console error, no request
leaving the page, every chart drawn, and prints (PDF).  A screenshot and the PDF are kept in tests/artefacts/
(ignored by git).  The README's picture is made by tests/report/screenshot.py from the demo's report."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from iotjx.settings import Settings
from tests.conftest import fresh_database
from tests.helpers import bearer, insert_key, store_uplinks
from tests.report.screenshot import CHROMIUM, browser

NANCHANG, YINGTAN = 360100, 360600
ARTEFACTS = Path(__file__).resolve().parents[1] / "artefacts"


@pytest.fixture(scope="module")
def filled(pg_admin_url, template_db, broker):
    """Two days of the province mix (small) through the write path, the sample site catalogue, and the
    snapshots of the two past days (history for the charts and pace)."""
    import time as wallclock

    from analytics.coverage import local_day, take_snapshot
    from iotjx.model import Uplink
    from iotjx.devices import register_devices
    from iotjx.sites import import_sites, load_sample_sites
    from iotjx.targets import load_catalogue
    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    gen = fresh_database(pg_admin_url, template_db)
    url = next(gen)
    now = wallclock.time()
    base = load_scenario("province-mix").scaled(0.003)
    scenario = replace(base, start=now - 2 * 86400 - 600, duration_s=2 * 86400)
    sim = Simulation(scenario)
    with psycopg.connect(url) as conn:
        import_sites(conn, load_sample_sites())
        register_devices(conn, sim.device_records)
    store_uplinks(url, [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
                        for r in sim.records() if r.t <= now])
    settings = Settings(database_url=url, **broker.gateway_settings(), coverage_refresh_s=0, analytics_interval_s=0)
    catalogue = load_catalogue(settings.targets_file)
    with psycopg.connect(url, autocommit=True) as conn:
        today = local_day(conn.execute("SELECT now()").fetchone()[0], settings.tz)
        for back in (2, 1):
            take_snapshot(conn, today - timedelta(days=back), catalogue, settings, how="filled")
    yield settings
    next(gen, None)


@pytest.fixture(scope="module")
def keys(filled):
    url = filled.database_url
    return {"viewer": insert_key(url, "viewer"), "nanchang": insert_key(url, "viewer", [NANCHANG])}


def _get(settings, key, path, **params):
    with TestClient(create_app(settings), headers=bearer(key), raise_server_exceptions=False) as client:
        return client.get(path, params=params)


class Figures(HTMLParser):
    """Every figure of the page by its data-* attributes: rows keyed by data-target-id / data-breakdown /
    data-radio, each a dict of data-key → data-value."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self.row: dict[str, str] | None = None
        self.charts: list[dict[str, str]] = []
        self.meta: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            for kind in ("data-target-id", "data-breakdown", "data-radio"):
                if kind in a:
                    self.row = self.rows.setdefault((kind, a[kind]), {})
        elif tag == "td" and self.row is not None and "data-key" in a:
            self.row[a["data-key"]] = a["data-value"]
        elif "data-chart" in a:
            self.charts.append(a)
        elif "data-day" in a:
            self.meta = a

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None


def figures(html: str) -> Figures:
    p = Figures()
    p.feed(html)
    return p


def _num(text: str) -> float | None:
    return None if text == "" else float(text)


def _assert_targets_equal(page: Figures, doc: dict) -> None:
    targets = {k[1]: v for k, v in page.rows.items() if k[0] == "data-target-id"}
    assert set(targets) == {t["target_id"] for t in doc["targets"]}
    for t in doc["targets"]:
        row = targets[t["target_id"]]
        assert _num(row["value"]) == t["value"] and _num(row["target"]) == t["target"], t["target_id"]
        assert row["status"] == t["status"] and row["deadline"] == t["deadline"], t["target_id"]
        if t["source"] == "programme":
            assert _num(row["percent"]) == t["percent"]
            assert _num(row["pace_needed"]) == t["pace_needed"] and _num(row["pace_observed"]) == t["pace_observed"]
            assert (row["projected_date"] or None) == t["projected_date"]
    breakdown = {k[1]: v for k, v in page.rows.items() if k[0] == "data-breakdown"}
    want = {f"{'' if r['city'] is None else r['city']}|{r['pilot']}|{r['network']}":
            {k: str(r[k]) for k in ("registered", "active", "live")} for r in doc["breakdown"]}
    assert breakdown == want


RADIO_RECOUNT = """
    WITH dev AS (SELECT d.device_id, coalesce(s.city_code, 0) AS city FROM devices d
                 LEFT JOIN sites s ON s.site_id = d.site_id WHERE d.status = 'active'),
    last AS (SELECT dev.device_id, dev.city,
                    (SELECT r.rsrp_dbm FROM radio_readings r WHERE r.device_id = dev.device_id AND r.rsrp_dbm IS NOT NULL
                       AND r.time >= now() - interval '7 days' ORDER BY r.time DESC LIMIT 1) AS rsrp,
                    (SELECT r.sinr_db FROM radio_readings r WHERE r.device_id = dev.device_id AND r.sinr_db IS NOT NULL
                       AND r.time >= now() - interval '7 days' ORDER BY r.time DESC LIMIT 1) AS sinr
             FROM dev)
    SELECT city, count(*) FILTER (WHERE rsrp IS NOT NULL OR sinr IS NOT NULL),
           count(*) FILTER (WHERE (rsrp IS NOT NULL OR sinr IS NOT NULL) AND coalesce(rsrp >= %(r)s, true)
                                  AND coalesce(sinr >= %(s)s, true)),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY rsrp)
    FROM last GROUP BY city HAVING count(*) FILTER (WHERE rsrp IS NOT NULL OR sinr IS NOT NULL) > 0"""


def _radio_recount(settings) -> dict[int, tuple[int, int, float]]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(RADIO_RECOUNT, {"r": settings.radio_rsrp_min_dbm, "s": settings.radio_sinr_min_db})
        return {c: (w, cov, p50) for c, w, cov, p50 in rows}


def test_page_figures_are_the_coverage_answer_and_radio_the_sql_recount(filled, keys):
    doc = _get(filled, keys["viewer"], "/coverage").json()
    res = _get(filled, keys["viewer"], "/reports/coverage")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    page = figures(res.text)
    assert page.meta["data-day"] == doc["day"] and page.meta["data-source"] == "live"
    assert {t["source"] for t in doc["targets"]} == {"plan", "programme"} and len(doc["breakdown"]) > 10
    _assert_targets_equal(page, doc)
    # a history chart per programme target, a chart per city of the breakdown
    assert sorted(c["data-target-id"] for c in page.charts if c["data-chart"] == "history") == \
        sorted(t["target_id"] for t in doc["targets"] if t["source"] == "programme")
    assert {c["data-city"] for c in page.charts if c["data-chart"] == "city"} == \
        {"" if r["city"] is None else str(r["city"]) for r in doc["breakdown"]}
    assert any(len(t["history"]) == 2 for t in doc["targets"] if t["source"] == "programme")
    # radio by city: a plain recount over radio_readings
    want = _radio_recount(filled)
    radio = {k[1]: v for k, v in page.rows.items() if k[0] == "data-radio"}
    cities = {int(k): v for k, v in radio.items() if k != "province"}
    got = {c: (int(v["with_radio"]), int(v["covered"])) for c, v in cities.items() if int(v["with_radio"]) > 0}
    assert got == {c: (w, cov) for c, (w, cov, _) in want.items()} and len(got) >= 5
    for c, (_, _, p50) in want.items():
        assert _num(cities[c]["rsrp_p50"]) == pytest.approx(p50)
    assert int(radio["province"]["with_radio"]) == sum(w for w, _, _ in want.values())
    # Chinese city names are in the page as text
    assert "南昌" in res.text and "鹰潭" in res.text


def test_a_city_key_sees_its_city_only_and_as_of_reads_the_snapshot(filled, keys):
    doc = _get(filled, keys["nanchang"], "/coverage").json()
    res = _get(filled, keys["nanchang"], "/reports/coverage")
    assert res.status_code == 200
    page = figures(res.text)
    _assert_targets_equal(page, doc)
    assert {k[1].split("|")[0] for k in page.rows if k[0] == "data-breakdown"} == {str(NANCHANG)}
    assert {k[1] for k in page.rows if k[0] == "data-radio"} <= {str(NANCHANG)}
    assert "鹰潭" not in res.text
    other = _get(filled, keys["nanchang"], "/reports/coverage", city=YINGTAN)
    assert other.status_code == 403 and other.headers["content-type"] == "application/problem+json"
    # a past day: the snapshot's figures, as /coverage?as_of= gives them; a day without one is a 404 problem
    yesterday = str(date.fromisoformat(doc["day"]) - timedelta(days=1))
    past = _get(filled, keys["viewer"], "/coverage", as_of=yesterday).json()
    res = _get(filled, keys["viewer"], "/reports/coverage", as_of=yesterday)
    page = figures(res.text)
    assert page.meta["data-source"] == "snapshot" and page.meta["data-day"] == yesterday
    _assert_targets_equal(page, past)
    missing = _get(filled, keys["viewer"], "/reports/coverage", as_of="2020-01-01")
    assert missing.status_code == 404 and missing.json()["status"] == 404


def test_cli_writes_the_same_page(filled, keys, tmp_path):
    out = tmp_path / "report.html"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTJX_")}
    env.update(IOTJX_DATABASE_URL=filled.database_url)
    proc = subprocess.run([sys.executable, "-m", "iotjx.cli", "report", "coverage", "--html", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(out.resolve()) in proc.stdout.replace("\n", "")
    doc = _get(filled, keys["viewer"], "/coverage").json()
    _assert_targets_equal(figures(out.read_text(encoding="utf-8")), doc)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(filled, keys, tmp_path):
    html = _get(filled, keys["viewer"], "/reports/coverage").text
    doc = _get(filled, keys["viewer"], "/coverage").json()
    path = tmp_path / "coverage.html"
    path.write_text(html, encoding="utf-8")
    errors, requests = [], []
    with browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri(), wait_until="load")
        state = page.evaluate("""() => ({
            images: document.images.length,
            drawn: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
            targets: [...document.querySelectorAll('tr[data-target-id]')].map(tr => [tr.dataset.targetId,
                tr.querySelector('td[data-key=value]').dataset.value,
                tr.querySelector('td[data-key=status]').textContent]),
            height: document.body.scrollHeight})""")
        ARTEFACTS.mkdir(exist_ok=True)
        shot = ARTEFACTS / "coverage-report.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        page.emulate_media(media="print")
        pdf = page.pdf(format="A4", landscape=True, print_background=True)
        (ARTEFACTS / "coverage-report.pdf").write_bytes(pdf)
    assert errors == []
    assert requests == [path.as_uri()]                  # self-contained: nothing fetched but the page itself
    programme = sum(1 for t in doc["targets"] if t["source"] == "programme")
    cities = len({r["city"] for r in doc["breakdown"]})
    assert state["images"] == state["drawn"] == programme + cities + 1       # + the radio chart
    assert {t for t, _, _ in state["targets"]} == {t["target_id"] for t in doc["targets"]}
    cjk = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
    assert "CJK" in cjk, "no CJK font: Chinese city names would render as boxes (apt-get install -y fonts-noto-cjk)"
    assert pdf[:5] == b"%PDF-" and pdf.count(b"/Type /Page") >= 2
