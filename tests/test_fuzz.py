"""The HTTP contract, fuzzed: schemathesis takes the service's OpenAPI document and sends what it describes and what
it does not (every operation; valid and invalid bodies as JSON and as multipart forms; boundary values; methods a
path does not serve) to a real uvicorn server (``LiveServer``: the middlewares and the connection guard in the loop)
serving the tiny test models. Every answer must be documented for its operation (status), carry a documented
content type and headers, match its JSON schema; no answer may be a 5xx other than the documented 503 / 504 (a 500
is a defect); schema-invalid requests must be refused; a path's 405 must name every method it serves.

A job's routes get real jobs as well as random ids (which answer 404): one finished, one cancelled, and one made
just before the request (so a DELETE finds it unfinished, a result request finds it running, an event stream follows
it to its end). Which one a request gets follows from its generated id, so the run stays reproducible.

Bounded and reproducible: a fixed seed, derandomized generation, ``MAX_EXAMPLES`` per operation, no example
database. The tiny models (max_duration 4 s, max_steps 50) make any generation cheap, so nothing is excluded. Not
checked: that every schema-valid request is accepted (a model's own limits, which modes it has, the webhook hosts
the operator allows and the init clip's content are not in the schema, and answer 422).

Run it alone: ``python -m pytest -q -s tests/test_fuzz.py`` (``-s`` prints what was sent and how it was answered)."""
from __future__ import annotations

import collections
import time
import zlib

import httpx
import pytest
import schemathesis

from service.app import create_app
from service.settings import Settings
from service_support import LiveServer

pytestmark = pytest.mark.slow  # about 1,700 requests end to end: `make test-fast` leaves it out

# requests per operation in the fuzzing phase (the coverage phase's enumerated boundary and invalid cases come on
# top); a job's routes, whose requests carry nothing but the id, get fewer
MAX_EXAMPLES = 250
MAX_EXAMPLES_JOB_ROUTES = 60
SEED = 20240607
CHECKS = {
    "enabled": False,
    # 503 (not ready, over capacity) and 504 (deadline passed) are answers the document declares; any other 5xx fails
    "not_a_server_error": {"enabled": True, "expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
    "status_code_conformance": {"enabled": True},
    "content_type_conformance": {"enabled": True},
    "response_schema_conformance": {"enabled": True},
    "response_headers_conformance": {"enabled": True},
    "negative_data_rejection": {"enabled": True},
    "unsupported_method": {"enabled": True},
    "allow_header_conformance": {"enabled": True},
}
CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": False}},
    "checks": CHECKS,
    "operations": [{"include-path-regex": "^/jobs/", "generation": {"max-examples": MAX_EXAMPLES_JOB_ROUTES}}],
}
JOB_KINDS = ("random", "fresh", "done", "cancelled")

SENT: collections.Counter = collections.Counter()  # (operation, status) -> requests, for the summary test

# The document the fuzzing follows, read when the tests are collected: the app's own (its routes alone make it, so
# it needs no server); test_the_served_document_is_the_fuzzed_one checks that the server serves exactly this.
# (schemathesis' loader from a fixture, which could read it from the running server, fails on pytest 9: it sets
# ``Node._nodeid``, which pytest 9 no longer has.)
DOCUMENT = create_app(Settings(_env_file=None)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict(CONFIG))


@pytest.fixture(scope="module")
def fuzz_server(base_settings):
    # the product's behaviour: no injected faults; the default connection limit, timeouts and body limits
    srv = LiveServer(base_settings.model_copy(update={"debug_faults": False}))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(fuzz_server):
    """A job id of each kind but random, for a request of a method: ``fresh`` makes a new job each time; DELETE
    gets a finished job of its own (it discards the result, which the other routes then find gone: 410)."""
    client = fuzz_server.client()

    def submit(**body) -> str:
        r = client.post("/jobs", json={"prompt": "a job for the fuzzer", **body})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    done, discarded = submit(duration=0.5, steps=2), submit(duration=0.5, steps=2)
    cancelled = submit(duration=4.0, steps=50)
    assert client.delete(f"/jobs/{cancelled}").status_code in (200, 202)
    deadline = time.monotonic() + 30
    while {client.get(f"/jobs/{i}").json()["status"] for i in (done, discarded, cancelled)} - {"done", "cancelled"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield {"done": lambda method: discarded if method == "DELETE" else done, "cancelled": lambda method: cancelled,
           "fresh": lambda method: submit(duration=2.0, steps=20)}
    client.close()


def test_the_served_document_is_the_fuzzed_one(fuzz_server):
    assert httpx.get(fuzz_server.url + "/openapi.json").json() == DOCUMENT


@schema.parametrize()
def test_every_operation_answers_as_documented(case, fuzz_server, jobs):
    generated = (case.path_parameters or {}).get("job_id")
    if isinstance(generated, str):
        kind = JOB_KINDS[zlib.crc32(generated.encode("utf-8", "surrogatepass")) % len(JOB_KINDS)]
        if kind != "random":
            case.path_parameters["job_id"] = jobs[kind](case.method.upper())
    response = case.call(base_url=fuzz_server.url, timeout=60)
    SENT[(case.operation.label, response.status_code)] += 1
    case.validate_response(response)


def test_the_fuzzing_reached_every_operation_and_real_work():
    """What the fuzzing sent: every operation, audio from both generation routes, jobs made, cancelled, discarded
    and fetched; printed with ``-s``."""
    if not SENT:
        pytest.skip("counts what test_every_operation_answers_as_documented sent: run the whole file")
    by_operation = collections.defaultdict(collections.Counter)
    for (op, status), n in SENT.items():
        by_operation[op][status] += n
    print(f"\nfuzzing: {sum(SENT.values())} requests over {len(by_operation)} operations")
    for op, statuses in sorted(by_operation.items()):
        print(f"  {op}: {sum(statuses.values())} ({', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))})")
    assert len(by_operation) == len([m for path in DOCUMENT["paths"].values() for m in path]), sorted(by_operation)
    assert by_operation["POST /generate"][200] and by_operation["POST /v1/audio/generate"][200]
    assert by_operation["POST /jobs"][202] and by_operation["DELETE /jobs/{job_id}"][202]
    assert by_operation["GET /jobs/{job_id}/result"][200] and by_operation["GET /jobs/{job_id}/result"][409]
    assert not [key for key in SENT if key[1] == 500], SENT
