"""Schema-driven fuzzing of the Serve application: schemathesis generates requests from the router's own
/openapi.json (multipart and JSON bodies, path and query parameters) and no answer may be a 5xx.

Bounded: at most 30 examples per operation, no shrinking; ~1 minute on 2 cores once the shared app runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (dev extra)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.test_serve import Served, shared_app  # noqa: E402

pytestmark = pytest.mark.ray

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def served_app(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield shared_app(tmp_path_factory)


def test_no_generated_request_gets_a_server_error(served_app: Served) -> None:
    """Every operation of the schema, MAX_EXAMPLES generated cases each (driven from here rather than
    through schemathesis's pytest plugin, which does not support the installed pytest)."""
    api = schemathesis.openapi.from_url(f"{served_app.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 9
    calls: dict[str, int] = {}
    for operation in operations:
        fuzz_operation(operation, calls)
    print(f"\nfuzzed: {calls}")
    # Operations with inputs get every example (those without have a single possible request).
    assert all(count == MAX_EXAMPLES for label, count in calls.items() if label.startswith("POST")), calls


def fuzz_operation(operation: Any, calls: dict[str, int]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as generated
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        response = case.call(timeout=60)
        calls[label] = calls.get(label, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        if 400 <= response.status_code < 500:  # every refusal says what is wrong, as JSON
            assert response.json()["error"], response.text

    run()
