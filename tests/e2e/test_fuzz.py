"""Fuzz every route from our own OpenAPI schema against real Serve: no input may cause a 5xx.

Schemathesis generates valid and invalid bodies (wrong types, boundary values, unknown
fields, odd strings) for each operation; each answer must be a deliberate status.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


def test_no_input_causes_a_server_error(demo_server):
    schema = schemathesis.openapi.from_url(f"{demo_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is in the schema, so every route is fuzzed
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=120)

        try:
            fuzz()
        except Exception as exc:  # collect all operations' failures, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
