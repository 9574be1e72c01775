"""The targets catalogue says what counts, and a catalogue that cannot be meant as written stops the start
with the file and the target named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api.app import create_app
from iotjx.settings import Settings
from iotjx.targets import CatalogueError, load_catalogue

GOOD = """
[[plan]]
id = "spots"
value = 100
unit = "percent"
deadline = 2022-12-31
[plan.measure]
kind = "site_share"
sites = [{ kind = "scenic_spot", min_grade = "4A" }]
devices = { family = ["parking"] }
"""


def test_the_bundled_catalogue_names_what_counts():
    targets = {t.target_id: t for t in load_catalogue()}
    parking = targets["tourism-smart-parking"]
    assert parking.devices.families == ("parking",) and parking.sites[0].min_grade == "4A"
    assert targets["smart-community-models"].sites[0].model_site is True
    assert "parking" not in targets["smart-campus"].devices.families
    assert targets["agri-iot-zones"].devices.families == ("water",)
    # "traffic" targets name lane detectors or parking sensors, never both under one pilot
    assert targets["nanchang-traffic-detectors-cat1"].devices.families == ("traffic",)
    assert all(t.devices is not None for t in targets.values() if t.measure != "operator")


@pytest.mark.parametrize(("change", "message"), [
    (('min_grade = "4A"', 'min_grade = "6A"'), "min_grade"),
    (('kind = "scenic_spot"', 'kind = "castle"'), "not a site kind"),
    (('family = ["parking"]', 'family = ["gas"]'), "family 'gas'"),
    (('devices = { family = ["parking"] }', 'devices = { }'), "must name the device family or models"),
    (('devices = { family = ["parking"] }', ''), "measure.devices must say which devices count"),
    (('value = 100', 'value = 120'), "cannot exceed 100"),
    (('value = 100', 'value = nan'), "value must be a number above 0"),
    (('value = 100', 'value = -5'), "value must be a number above 0"),
    (('unit = "percent"', 'unit = "sites"'), "site_share target is a percent"),
    (('deadline = 2022-12-31', 'deadline = "end of 2022"'), "deadline must be a TOML date"),
    (('deadline = 2022-12-31', 'deadline = 2022-12-31\ncity = 999999'), "division code"),
    (('kind = "site_share"', 'kind = "site_share"\nmin_live = 0'), "min_live"),
    (('kind = "site_share"', 'kind = "site_share"\nmin_live_share = 150'), "min_live_share"),
    (('kind = "site_share"', 'kind = "site_share"\nmin_lives = 2'), "unknown key(s) min_lives"),
    (('devices = { family = ["parking"] }', 'devices = { models = ["no-such-model"] }'), "unknown device model"),
    (('devices = { family = ["parking"] }', 'devices = { family = ["traffic"], network = "nbiot" }'),
     "no device model of traffic is a nbiot model"),
    (('id = "spots"', 'id = ""'), "needs an id"),
])
def test_a_malformed_catalogue_is_refused_naming_the_target(tmp_path, change, message):
    path = tmp_path / "targets.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(CatalogueError) as err:
        load_catalogue(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_the_same_id_twice_and_a_typo_in_a_section_are_refused(tmp_path):
    path = tmp_path / "targets.toml"
    path.write_text(GOOD + GOOD)
    with pytest.raises(CatalogueError, match="used twice"):
        load_catalogue(path)
    path.write_text(GOOD.replace("[[plan]]", "[[plans]]").replace("[plan.measure]", "[plans.measure]"))
    with pytest.raises(CatalogueError, match="unknown section"):
        load_catalogue(path)


def test_the_api_and_the_cli_do_not_start_on_a_bad_catalogue(tmp_path, db_url):
    path = tmp_path / "targets.toml"
    path.write_text(GOOD.replace('value = 100', 'value = 120'))
    with pytest.raises(CatalogueError, match="spots"):
        create_app(Settings(database_url=db_url, targets_file=path))
    env = {"IOTJX_DATABASE_URL": db_url, "IOTJX_TARGETS_FILE": str(path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "iotjx.cli", "coverage"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "spots" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_site_targets_without_catalogue_sites_are_named_at_start_up(db_url):
    import psycopg

    from analytics.coverage import catalogue_problems
    from iotjx.sites import import_sites, load_sample_sites

    with psycopg.connect(db_url) as conn:
        before = catalogue_problems(conn, load_catalogue())
        assert {p.split(":")[0] for p in before} == {
            "target tourism-smart-parking", "target smart-community-models", "target agri-iot-zones",
            "target digital-dev-zones", "target smart-campus"}
        import_sites(conn, load_sample_sites())
        assert catalogue_problems(conn, load_catalogue()) == []
