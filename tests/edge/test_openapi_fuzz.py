"""Schemathesis against the live edge's /openapi.json: no input yields a 500, and every
answer matches the documented status codes, content types and schemas.

Bounded to a few examples per operation and mode so the run stays within seconds.
/events is left out: it is a stream that never ends. Cases are generated with
schemathesis' strategies under plain Hypothesis (its pytest plugin's lazy fixtures
do not run on pytest 9).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from tests.edge.conftest import API_KEY

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def api_schema(edge):
    config = SchemathesisConfig.from_dict({
        "base-url": edge.url,
        # Unknown query parameters are ignored, as most HTTP APIs do (cache busters...).
        "generation": {"allow-extra-parameters": False},
        "checks": {
            # Data valid by the schema may still break a rule only the database knows
            # (an unknown profile name, a URL that is not http): 422 is a fair answer.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "403", "404", "409", "422"],
            },
            # The test edge caps bodies at 64 KiB: a large invalid body is refused early.
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "409", "413", "422"],
            },
        },
    })
    return schemathesis.openapi.from_url(f"{edge.url}/openapi.json", config=config)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=lambda m: m.value)
def test_no_input_breaks_the_api(api_schema, mode) -> None:
    operations = [r.ok() for r in api_schema.exclude(path="/events").get_all_operations()]
    assert len(operations) == 16

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call_and_validate(case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)

        try:
            call_and_validate()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid input to send.
            if mode is GenerationMode.POSITIVE:
                raise
