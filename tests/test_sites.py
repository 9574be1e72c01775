"""The site catalogue against the real database: import (create, update, names, merging of unverified
sites, ambiguity, scope, all or nothing), and device registration resolving sites through it."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import date

import psycopg
import pytest

from iotjx.devices import DeviceRecord, OutOfScope, RegistrationError, register_devices
from iotjx.sites import SiteRecord, import_sites, load_sample_sites, name_key, parse_sites_csv

YINGTAN, NANCHANG, JIUJIANG = 360600, 360100, 360400
WATER = "cjt188-nb-water-std"
PARKING = "nb-parking-sensor"


def _device(n: int, **kw) -> DeviceRecord:
    return DeviceRecord(device_id=f"8699750300{n:05d}", model=kw.pop("model", PARKING), **kw)


def _sites(conn) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in conn.execute(
        "SELECT code, city_code, kind, name, grade, model_site, model_site_since, status, opened_on, closed_on "
        "FROM sites WHERE code IS NOT NULL")}


def test_name_key_normalises_width_case_and_spaces():
    assert name_key("  庐山　 风景区 ") == "庐山 风景区"                  # ideographic space, runs, ends
    assert name_key("ＬＵＳＨＡＮ") == name_key("lushan") == "lushan"      # full width, case
    assert name_key("Straße") == name_key("STRASSE")                      # casefold, not lower


def test_import_creates_then_updates_every_attribute_and_the_names(db_url):
    sample = load_sample_sites()
    with psycopg.connect(db_url) as conn:
        assert import_sites(conn, sample) == {"created": len(sample), "updated": 0, "merged_unverified": 0,
                                              "devices_moved": 0}
        stored = _sites(conn)
        assert len(stored) == len(sample) == 33
        assert stored["JX-SS-0004"] == (YINGTAN, "scenic_spot", "龙虎山风景名胜区", "5A", False, None, "active",
                                        None, None)
        assert stored["JX-CO-0004"][-3:] == ("closed", date(2023, 1, 1), date(2025, 3, 31))
        names = conn.execute("SELECT n.name_key, n.name, n.is_alias FROM site_names n JOIN sites s USING (site_id) "
                             "WHERE s.code = 'JX-SS-0004' ORDER BY is_alias, name_key").fetchall()
        assert names == [("龙虎山风景名胜区", "龙虎山风景名胜区", False), ("longhushan", "Longhushan", True),
                         ("龙虎山", "龙虎山", True)]
        assert conn.execute("SELECT count(*) FROM site_names").fetchone()[0] == sum(
            len(r.keys()) for r in sample)
        before = conn.execute("SELECT updated_at FROM sites WHERE code = 'JX-SS-0004'").fetchone()[0]
        changed = replace(sample[3], name="龙虎山景区", aliases=("Longhushan",), grade="4A", model_site=True,
                          model_site_since=date(2025, 5, 1), opened_on=date(2020, 1, 1))
        conn.commit()
        assert import_sites(conn, [changed]) == {"created": 0, "updated": 1, "merged_unverified": 0,
                                                 "devices_moved": 0}
        assert _sites(conn)["JX-SS-0004"] == (YINGTAN, "scenic_spot", "龙虎山景区", "4A", True, date(2025, 5, 1),
                                              "active", date(2020, 1, 1), None)
        # The old names are gone: "龙虎山" no longer names it.
        assert sorted(r[0] for r in conn.execute(
            "SELECT name_key FROM site_names n JOIN sites s USING (site_id) WHERE s.code = 'JX-SS-0004'")) == [
            "longhushan", "龙虎山景区"]
        assert conn.execute("SELECT updated_at FROM sites WHERE code = 'JX-SS-0004'").fetchone()[0] > before


def test_aliases_resolve_free_text_so_two_spellings_are_one_site(db_url):
    with psycopg.connect(db_url) as conn:
        import_sites(conn, load_sample_sites())
        result = register_devices(conn, [
            _device(1, city="Yingtan", site_kind="scenic_spot", site_name="龙虎山"),
            _device(2, city="鹰潭", site_kind="scenic_spot", site_name=" LONGHUSHAN "),
            _device(3, city="360600", site_kind="scenic_spot", site_name="龙虎山风景名胜区"),
            _device(4, city="Yingtan", site_kind="scenic_spot", site_name="上清古镇"),      # not in the catalogue
            _device(5, city="Nanchang", site_kind="scenic_spot", site_name="龙虎山")])      # another city: no match
        assert result == {"created": 5, "updated": 0, "sites": 3, "catalogue_sites": 1, "unverified_sites": 2}
        rows = conn.execute("SELECT d.device_id, s.code FROM devices d JOIN sites s USING (site_id) "
                            "ORDER BY d.device_id").fetchall()
        assert [code for _, code in rows] == ["JX-SS-0004"] * 3 + [None, None]
        assert conn.execute("SELECT count(*) FROM sites WHERE code IS NULL").fetchone()[0] == 2


def test_the_scenario_site_names_resolve_to_catalogue_sites(db_url):
    from simulators.fleet import plan_scenario
    from simulators.scenario import load_scenario

    planned = [p for p in plan_scenario(load_scenario("province-mix")) if p.record.site_kind == "scenic_spot"]
    assert {p.record.site_name for p in planned} == {"龙虎山", "庐山", "三清山", "婺源", "井冈山"}
    with psycopg.connect(db_url) as conn:
        import_sites(conn, load_sample_sites())
        result = register_devices(conn, [p.record for p in planned])
        assert result["unverified_sites"] == 0 and result["catalogue_sites"] == 5


def test_import_absorbs_unverified_sites_and_moves_their_devices(db_url):
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [
            _device(1, city="Jiujiang", site_kind="scenic_spot", site_name="庐山风景名胜区"),   # adopted (exact name)
            _device(2, city="Jiujiang", site_kind="scenic_spot", site_name="庐山"),             # absorbed
            _device(3, city="Jiujiang", site_kind="scenic_spot", site_name="庐山"),
            _device(4, city="Jiujiang", site_kind="scenic_spot", site_name="lushan"),           # absorbed
            _device(5, city="Jiujiang", site_kind="parking_lot", site_name="庐山"),             # another kind: stays
        ])
        unverified = dict(conn.execute("SELECT name, site_id FROM sites WHERE kind = 'scenic_spot'").fetchall())
        assert len(unverified) == 3
        result = import_sites(conn, load_sample_sites())
        assert result["merged_unverified"] == 3 and result["devices_moved"] == 3
        assert result["created"] == 33 and result["updated"] == 0
        lushan = conn.execute("SELECT site_id FROM sites WHERE code = 'JX-SS-0001'").fetchone()[0]
        assert lushan == unverified["庐山风景名胜区"]                 # the exact-name row was adopted
        assert conn.execute("SELECT device_id FROM devices WHERE site_id = %s ORDER BY 1",
                            (lushan,)).fetchall() == [(_device(n).device_id,) for n in (1, 2, 3, 4)]
        assert conn.execute("SELECT kind, name FROM sites WHERE code IS NULL").fetchall() == [("parking_lot", "庐山")]


def test_a_name_of_two_catalogue_sites_is_refused_naming_both(db_url):
    sample = load_sample_sites()
    with psycopg.connect(db_url) as conn:
        import_sites(conn, sample)
        conn.commit()
        other = SiteRecord("JX-SS-9999", "Jiujiang", "scenic_spot", "另一个景区", aliases=("庐山",))
        with pytest.raises(RegistrationError) as exc:
            import_sites(conn, [other])
        assert "JX-SS-9999" in str(exc.value) and "JX-SS-0001" in str(exc.value)
        # Within one file too.
        twin = SiteRecord("JX-SS-9998", "Jiujiang", "scenic_spot", "第三个景区", aliases=("Lushan West",))
        with pytest.raises(RegistrationError) as exc:
            import_sites(conn, [replace(other, aliases=("lushan west",)), twin])
        assert "JX-SS-9999" in str(exc.value) and "JX-SS-9998" in str(exc.value)
        # The same name in another kind or city is no conflict.
        import_sites(conn, [replace(other, kind="parking_lot"), replace(twin, city="Nanchang", aliases=("庐山",))])
        assert conn.execute("SELECT count(*) FROM sites WHERE code IN ('JX-SS-9999', 'JX-SS-9998')").fetchone()[0] == 2


def test_bad_csv_lines_are_named_and_a_bad_file_imports_nothing(db_url):
    text = ("# a comment line\n"
            "site_id,city,kind,name,aliases,grade,model_site,model_site_since,status,opened_on,closed_on\n"
            "JX-SS-0001,Jiujiang,scenic_spot,庐山风景名胜区,庐山,5A,false,,,,\n"
            "JX-SS-0002,Atlantis,scenic_spot,x,,6A,maybe,,,,\n"
            "JX-SS-0003,Shangrao,scenic_spot,三清山,,,false,2024-01-01,,,\n"
            "JX-SS-0001,Jiujiang,museum,y,,,,,,,\n"
            "JX-CO-0001,Yingtan,community,z,,,,,closed,,\n"
            "JX-CO-0002,Yingtan,community,w,,,,,,2024-05-01,2024-01-01\n"
            "JX-CO-0003,Yingtan,community,v,,,,,,1999-12-31,\n")
    with psycopg.connect(db_url) as conn:
        from iotjx.devices import Registry
        with pytest.raises(RegistrationError) as exc:
            parse_sites_csv(text, registry=Registry.load(conn))
        lines = {n for n, _ in exc.value.errors}
        assert lines == {4, 5, 6, 7, 8, 9}
        messages = " ".join(m for _, m in exc.value.errors)
        for expected in ("model_site 'maybe'", "model_site_since is given", "JX-SS-0001 appears twice",
                         "a closed site needs closed_on", "closed_on 2024-01-01 is before opened_on",
                         "opened_on must lie between"):
            assert expected in messages, expected
        with pytest.raises(RegistrationError, match="header lacks column"):
            parse_sites_csv("site_id,city,name\nA,Yingtan,x\n")
        # A closed_on without status: closed.
        assert parse_sites_csv("site_id,city,kind,name,closed_on\nA,Yingtan,farm,x,2025-01-01\n")[0].status == "closed"
        # import_sites is all or nothing: a bad record among good ones leaves the table as it was.
        good = load_sample_sites()
        with pytest.raises(RegistrationError):
            import_sites(conn, [*good, SiteRecord("JX-X", "Yingtan", "farm", "x", status="closed")])
        assert conn.execute("SELECT count(*) FROM sites").fetchone()[0] == 0


def test_import_is_all_or_nothing_when_the_database_refuses(db_url):
    with psycopg.connect(db_url) as conn:
        import_sites(conn, [SiteRecord("JX-SS-0001", "Jiujiang", "scenic_spot", "庐山风景名胜区", aliases=("庐山",))])
        conn.commit()
        with pytest.raises(RegistrationError, match="JX-SS-0001"):
            import_sites(conn, [SiteRecord("JX-SS-0100", "Yingtan", "farm", "新农场"),
                                SiteRecord("JX-SS-0101", "Jiujiang", "scenic_spot", "庐山")])
        assert sorted(_sites(conn)) == ["JX-SS-0001"]


def test_a_scoped_caller_imports_only_its_cities(db_url):
    with psycopg.connect(db_url) as conn:
        site = SiteRecord("JX-FA-0001", "Yingtan", "farm", "示例农场")
        with pytest.raises(OutOfScope):
            import_sites(conn, [site], cities=[NANCHANG])
        import_sites(conn, [site])
        conn.commit()
        with pytest.raises(OutOfScope, match="JX-FA-0001"):            # moving another city's site to one's own
            import_sites(conn, [replace(site, city="Nanchang")], cities=[NANCHANG])
        assert _sites(conn)["JX-FA-0001"][0] == YINGTAN
        # A device registered by catalogue code is scoped by the site's city.
        with pytest.raises(OutOfScope):
            register_devices(conn, [_device(1, model=WATER, site_id="JX-FA-0001")], cities=[NANCHANG])
        assert register_devices(conn, [_device(1, model=WATER, site_id="JX-FA-0001")], cities=[YINGTAN])["created"] == 1


def test_the_network_is_checked_against_the_model(db_url):
    with psycopg.connect(db_url) as conn:
        detector = dict(city="Nanchang", site_kind="intersection", site_name="八一大道 1")
        with pytest.raises(RegistrationError) as exc:
            register_devices(conn, [_device(1, model="gbt43229-detector", network="nbiot", **detector)])
        assert "model gbt43229-detector is a cat1 model: it cannot be registered as nbiot" in str(exc.value)
        register_devices(conn, [_device(1, model="gbt43229-detector", **detector),
                                _device(2, model=WATER, city="Nanchang", site_kind="residential", site_name="a")])
        assert conn.execute("SELECT device_id, network FROM devices ORDER BY 1").fetchall() == [
            (_device(1).device_id, "cat1"), (_device(2).device_id, "nbiot")]
        # A model without a fixed network needs one given.
        conn.execute("UPDATE device_models SET network = NULL WHERE model = %s", (WATER,))
        with pytest.raises(RegistrationError, match="may be on either network"):
            register_devices(conn, [_device(3, model=WATER, city="Nanchang", site_kind="residential", site_name="a")])
        register_devices(conn, [_device(3, model=WATER, network="cat1", city="Nanchang", site_kind="residential",
                                        site_name="a")])


def test_a_device_named_by_site_id_attaches_there_and_must_agree(db_url):
    with psycopg.connect(db_url) as conn:
        import_sites(conn, load_sample_sites())
        assert register_devices(conn, [_device(1, site_id="JX-SS-0004"),
                                       _device(2, site_id="JX-SS-0004", city="鹰潭", site_kind="scenic_spot",
                                               site_name="Longhushan")]) == {
            "created": 2, "updated": 0, "sites": 1, "catalogue_sites": 1, "unverified_sites": 0}
        assert conn.execute("SELECT DISTINCT s.code FROM devices JOIN sites s USING (site_id)").fetchall() == [
            ("JX-SS-0004",)]
        for bad, message in ((dict(site_id="JX-NOPE"), "unknown site_id 'JX-NOPE'"),
                             (dict(site_id="JX-SS-0004", city="Nanchang"), "is in city 360600, not 'Nanchang'"),
                             (dict(site_id="JX-SS-0004", site_kind="museum"), "is a scenic_spot, not a museum"),
                             (dict(site_id="JX-SS-0004", site_name="庐山"), "'庐山' is not one of its names"),
                             (dict(city="Yingtan", site_kind="scenic_spot"), "site_name is empty"),
                             (dict(), "city, site_kind, site_name are empty")):
            with pytest.raises(RegistrationError) as exc:
                register_devices(conn, [_device(7, site_id="JX-SS-0004"), _device(3, **bad)], first_line=2)
            assert exc.value.errors[0][0] == 3 and message in exc.value.errors[0][1], (bad, exc.value.errors)


def test_ten_thousand_sites_import_in_seconds(db_url):
    kinds = ("community", "campus", "farm", "dev_zone", "scenic_spot")
    records = [SiteRecord(f"JX-T-{i:05d}", str(360100 + 100 * (i % 11)), kinds[i % 5], f"站点 {i}",
                          aliases=(f"site {i}", f"S{i}"), grade="4A" if i % 5 == 4 else None,
                          model_site=i % 7 == 0) for i in range(10_000)]
    with psycopg.connect(db_url) as conn:
        start = time.perf_counter()
        assert import_sites(conn, records)["created"] == 10_000
        first = time.perf_counter() - start
        start = time.perf_counter()
        assert import_sites(conn, records)["updated"] == 10_000
        again = time.perf_counter() - start
        assert conn.execute("SELECT count(*) FROM site_names").fetchone()[0] == 30_000
    print(f"10,000 sites: first import {first:.2f} s, again {again:.2f} s")
    assert first < 10 and again < 10


def test_cli_imports_audits_and_lists(db_url, tmp_path):
    import os
    import subprocess
    import sys
    from importlib import resources

    env = {**os.environ, "IOTJX_DATABASE_URL": db_url, "COLUMNS": "200"}
    sample = resources.files("iotjx.targets").joinpath("sites-sample.csv")
    run = subprocess.run([sys.executable, "-m", "iotjx.cli", "sites", "import", str(sample)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("site_id,city,kind,name\nA,Yingtan,farm,x\nB,Atlantis,farm,y\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "iotjx.cli", "sites", "import", str(bad)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "line 3" in run.stdout and "Atlantis" in run.stdout
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [_device(1, city="Yingtan", site_kind="scenic_spot", site_name="上清古镇")])
        assert conn.execute("SELECT count(*) FROM sites WHERE code IS NOT NULL").fetchone()[0] == 33
        assert conn.execute("SELECT method, change->>'created' FROM audit_log").fetchall() == [("sites import", "33")]
    run = subprocess.run([sys.executable, "-m", "iotjx.cli", "sites", "list", "--unverified", "--city", "鹰潭"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "上清古镇" in run.stdout and "JX-SS" not in run.stdout, run.stdout
    run = subprocess.run([sys.executable, "-m", "iotjx.cli", "sites", "list", "--city", "Yingtan"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert "JX-SS-0004" in run.stdout and "JX-SS-0001" not in run.stdout, run.stdout


def test_device_csv_names_a_site_by_code_or_free_text(db_url):
    from iotjx.devices import Registry, parse_csv

    with psycopg.connect(db_url) as conn:
        import_sites(conn, load_sample_sites())
        records = parse_csv("device_id,model,site_id,city,site_kind,site_name\n"
                            "869975030000018,nb-parking-sensor,JX-SS-0001,,,\n"
                            "869975030000026,nb-parking-sensor,,Shangrao,scenic_spot,婺源\n",
                            registry=Registry.load(conn))
        assert records[0].site_id == "JX-SS-0001" and records[1].site_id is None and records[0].network == ""
        assert register_devices(conn, records, first_line=2)["catalogue_sites"] == 2


def test_districts_resolve_by_code_or_name_within_the_city_and_unknown_ones_are_refused(db_url):
    """The sample catalogue's districts each lie in their site's city; a district is given by its code,
    its Chinese or English name; one of another city, an unknown code or name is refused with the line,
    and nothing is written."""
    sample = load_sample_sites()
    assert all(r.district for r in sample)
    with psycopg.connect(db_url) as conn:
        import_sites(conn, sample)
        conn.commit()
        rows = conn.execute("SELECT s.code, s.city_code, s.district_code, di.name_zh FROM sites s "
                            "JOIN districts di ON di.code = s.district_code").fetchall()
        assert len(rows) == len(sample)
        assert all(str(district)[:4] == str(city)[:4] for _, city, district, _ in rows)
        by_code = {code: (district, zh) for code, _, district, zh in rows}
        assert by_code["JX-SS-0006"] == (360102, "东湖区")          # 滕王阁
        assert by_code["JX-SS-0004"] == (360681, "贵溪市")          # 龙虎山
        assert by_code["JX-SS-0002"] == (360881, "井冈山市")
        assert by_code["JX-SS-0005"] == (361130, "婺源县")
        given = [SiteRecord("JX-D-1", "Nanchang", "farm", "d1", district="360113"),
                 SiteRecord("JX-D-2", "南昌", "farm", "d2", district="新建区"),
                 SiteRecord("JX-D-3", "360100", "farm", "d3", district="qingshanhu district"),
                 SiteRecord("JX-D-4", "Nanchang", "farm", "d4")]
        import_sites(conn, given)
        conn.commit()
        assert dict(conn.execute("SELECT code, district_code FROM sites WHERE code LIKE 'JX-D-%'").fetchall()) == {
            "JX-D-1": 360113, "JX-D-2": 360112, "JX-D-3": 360111, "JX-D-4": None}
        before = conn.execute("SELECT code, district_code FROM sites ORDER BY code").fetchall()
        bad = [SiteRecord("JX-D-1", "Nanchang", "farm", "d1", district="360202"),     # 昌江区: Jingdezhen
               SiteRecord("JX-D-2", "Nanchang", "farm", "d2", district="360199"),
               SiteRecord("JX-D-3", "Nanchang", "farm", "d3", district="湾里区"),     # merged into 新建区 in 2019
               SiteRecord("JX-D-4", "Nanchang", "farm", "d4", district="360124")]
        with pytest.raises(RegistrationError) as exc:
            import_sites(conn, bad, first_line=2)
        assert dict(exc.value.errors) == {
            2: "district 360202 (昌江区) belongs to city 360200, not to this site's city Nanchang (360100)",
            3: "unknown district '360199': not one of the county-level divisions this system knows (GB/T 2260, "
               "table districts)",
            4: "unknown district '湾里区' in city Nanchang (360100): give its division code (e.g. 360102) or its "
               "name within the city (e.g. 东湖区)"}
        conn.rollback()
        assert conn.execute("SELECT code, district_code FROM sites ORDER BY code").fetchall() == before
        # Through the CSV: the district column is optional and read as written.
        parsed = parse_sites_csv("site_id,city,kind,name,district\nA,Yingtan,farm,x, 余江区 \nB,Yingtan,farm,y,\n")
        assert [r.district for r in parsed] == ["余江区", None]
