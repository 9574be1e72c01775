"""Property-based API testing from the OpenAPI document (schemathesis): no 5xx, responses conform.

Driven through schemathesis's Python API (its pytest plugin does not load under pytest 9)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app


def test_every_operation_conforms_to_the_openapi_document(settings):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:
        # What the schema cannot say: a CSV body's rows are a string to OpenAPI, and which commands a
        # device takes depends on its codec (a 422 there is the API explaining, not refusing valid data).
        semantic = ("/devices/bulk", "/devices/{device_id}/downlinks")
        excluded = [positive_data_acceptance] if operation.path in semantic and operation.method == "post" else []

        @given(case=operation.as_strategy())
        @hsettings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(excluded_checks=excluded)

        check()
