"""schemathesis against the live server's own ``/openapi.json``: no 500s, every response matches
the schema (status documented, content type, body, headers), a schema-invalid request is refused
with a 4xx (``negative_data_rejection``), and a request without the key is refused
(``ignored_auth``): schemathesis' default checks, for positive and negative requests. One
default check is left out: ``positive_data_acceptance`` (a schema-valid request must be
accepted) cannot hold for rules JSON Schema cannot state (``valid_from < valid_to``, sizes in
UTF-8 bytes), which the server answers with 422 as it should; and ``not_a_server_error`` is
replaced by :func:`no_internal_error`, which lets a documented 503 / 504 through.

Each operation gets its own bounded Hypothesis run (``MAX_EXAMPLES`` per mode), so every one is
exercised; all failures are gathered and reported together. (Driven through ``as_strategy``:
schemathesis' lazy ``from_fixture`` loader does not run under pytest 9.)
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import Server

MAX_EXAMPLES = int(os.environ.get("MEMFUSION_SCHEMA_EXAMPLES", "10"))
"""Per operation and mode; raise it for a deeper run (``MEMFUSION_SCHEMA_EXAMPLES=200``)."""
DERANDOMIZE = os.environ.get("CI", "").lower() in ("1", "true")
"""CI draws the same examples every run (a failure there reproduces); local runs explore new ones."""


def no_internal_error(ctx: Any, response: Any, case: Case) -> bool | None:
    """Like schemathesis' ``not_a_server_error``, but a documented 503 / 504 is an answer, not a
    failure: a client may ask for a 1e-300 s deadline, and the right answer to it is a 504."""
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")
    return None


def _run(operation: Any, mode: GenerationMode, server: Server, headers: dict[str, str]) -> str | None:
    """One bounded run; the failure report, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=DERANDOMIZE,
    )
    def check(case: Case) -> None:
        case.call_and_validate(
            base_url=server.base,
            headers=headers,
            excluded_checks=[positive_data_acceptance, not_a_server_error],
            additional_checks=[no_internal_error],
        )

    try:
        check()
    except (Exception, BaseExceptionGroup) as exc:  # a schemathesis FailureGroup, a hypothesis error
        return f"{operation.label} [{mode.value}]:\n{exc}"
    return None


def _modes(operation: Any) -> tuple[GenerationMode, ...]:
    """Negative requests exist only for an operation that takes parameters or a body."""
    raw = operation.schema.raw_schema["paths"][operation.path][operation.method.lower()]
    takes_input = bool(raw.get("parameters")) or "requestBody" in raw or bool(raw.get("security"))
    return (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,)


def test_api_conforms_to_its_schema(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    headers = {"Authorization": f"Bearer {server.tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14  # every route is in the schema
    failures = [
        report
        for operation in operations
        for mode in _modes(operation)
        if (report := _run(operation, mode, server, headers)) is not None
    ]
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
