"""Property-based API testing from the OpenAPI document (schemathesis): no 5xx, responses conform,
with a key of each role (admin, operator, viewer, a city-scoped viewer) and with none (every
operation but /health then answers 401, as its documented problem).

Driven through schemathesis's Python API (its pytest plugin does not load under pytest 9)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from tests.helpers import bearer, insert_key

FIGURE_WINDOWS = ("/water/consumption", "/water/consumption.csv", "/water/consumption/districts",
                  "/water/consumption/districts.csv", "/water/sites/{site_id}/nights",
                  "/water/sites/{site_id}/nights.csv", "/traffic/flow", "/traffic/flow.csv", "/traffic/parking",
                  "/traffic/parking.csv", "/radio/summary", "/radio/summary.csv", "/radio/report", "/radio/weak.csv",
                  "/health/uplink-success", "/health/uplink-success.csv")


ROLES = {"admin": ("admin", None), "operator": ("operator", None), "viewer": ("viewer", None),
         "nanchang-viewer": ("viewer", [360100]), "none": None}


@pytest.mark.parametrize("who", list(ROLES))
def test_every_operation_conforms_to_the_openapi_document(settings, who):
    admin = bearer(insert_key(settings.database_url, "admin"))
    role = ROLES[who]
    headers = admin if who == "admin" else bearer(insert_key(settings.database_url, *role)) if role else {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings), headers=admin)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    answered: dict[str, list[int]] = {}
    for operation in operations:
        statuses = answered.setdefault(f"{operation.method.upper()} {operation.path}", [])
        # What the schema cannot say: a CSV body's rows are a string to OpenAPI, which commands a device
        # takes depends on its codec, and installed_at's window (2000-01-01 .. tomorrow) moves with the
        # clock (a 422 there is the API explaining, not refusing valid data), as do the days a coverage
        # report, snapshot or operator figure may describe (past days; from/to at most 3660 days apart);
        # a catalogue site's rules across fields (closed iff closed_on, model_site_since only for a model
        # site, a scenic spot's grade); a telemetry series' from before its to, and its tz an IANA zone; a
        # device moved by PATCH to a site_id must name a catalogue site.
        semantic = {("POST", "/devices/bulk"), ("POST", "/devices/{device_id}/downlinks"), ("POST", "/devices"),
                    ("GET", "/coverage"), ("GET", "/reports/coverage"), ("PUT", "/targets/{target_id}/progress"),
                    ("POST", "/coverage/snapshots"),
                    ("GET", "/targets/{target_id}/history"), ("POST", "/sites"), ("POST", "/sites/bulk"),
                    ("GET", "/devices/{device_id}/telemetry"), ("GET", "/sites/{site_id}/telemetry"),
                    # a time window's until after its since
                    ("GET", "/alarms"), ("GET", "/alarms.csv"), ("GET", "/alarms/kpis"), ("GET", "/water/alerts"),
                    ("GET", "/water/alerts.csv"), ("GET", "/rejects"),
                    ("POST", "/rejects/redecode"),
                    ("GET", "/devices"), ("GET", "/devices.csv"), ("GET", "/cities"), ("PATCH", "/devices/{device_id}"),
                    # the figures' windows: from before to, at most a bounded span, from in the past
                    *{("GET", p) for p in FIGURE_WINDOWS}}
        # A key of a lower role (or none) is refused valid data by design: 403 / 401 are its answers.
        excluded = ([positive_data_acceptance] if (operation.method.upper(), operation.path) in semantic
                    or who != "admin" else [])

        @given(case=operation.as_strategy())
        @hsettings(max_examples=30 if who == "admin" else 8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # A list's cursor is opaque (api/pagination.py): one the API did not make is a 422, which no
            # schema can say; a case without one is held to every check.
            cursor = bool(case.query) and "cursor" in case.query
            skip = [*excluded, positive_data_acceptance] if cursor and not excluded else excluded
            statuses.append(case.call_and_validate(headers=headers, excluded_checks=skip).status_code)

        check()
    if who == "none":
        # 401 for all; a URL the API cannot read at all (a NUL in the path) is a 400 before the key is asked
        assert {op: 401 in got and set(got) <= {400, 401} for op, got in answered.items() if op != "GET /health"} == \
            {op: True for op in answered if op != "GET /health"}, answered
        return
    # The key was sent: the API answered, rather than refusing every call at the door; most operations
    # answered a 2xx to some generated case (the figures' windows make many of their cases a 422; a
    # viewer's writes are 403s).
    assert not [op for op, got in answered.items() if 401 in got]
    if who != "admin":
        assert any(403 in got for got in answered.values())
        return
    served = [op for op, got in answered.items() if any(200 <= s < 300 for s in got)]
    assert len(served) > len(answered) // 2, sorted(set(answered) - set(served))
