"""Hostile input to `evomerge serve`: schema fuzzing, oversized and deeply nested bodies,
non-finite coefficients, unknown experts, wrong keys. Never a 5xx; the server answers on."""

from __future__ import annotations

import json

import httpx
import pytest

from evomerge.serve.protocol import Limits
from tests.helpers.fuzz import fuzz
from tests.helpers.provider import API_KEY

pytestmark = pytest.mark.timeout(300)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
EXAMPLES = [{"prompt": "Question: sky? Answer:", "answer": " blue", "id": "s1"}]
PROBE = {"prompt": "Question: what colour is the sky? Answer: blue", "max_tokens": 0, "echo": True, "logprobs": 0,
         "merge": {"method": "evo", "experts": ["math", "colour"], "weights": [0.7, -0.3], "densities": [0.5, 1.0]}}


def probe(server) -> list[float]:
    """A normal request's answer: the server must still give exactly this after any abuse."""
    r = httpx.post(server.base_url + "/completions", headers=AUTH, json=PROBE, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


@pytest.fixture(scope="module")
def session_path(server) -> str:
    r = httpx.post(server.base_url + "/sessions", headers=AUTH, json={"experts": ["math"], "examples": EXAMPLES})
    return f"/sessions/{r.json()['id']}/evaluate"


def post_routes(session_path: str) -> list[str]:
    return ["/completions", "/chat/completions", "/sessions", session_path]


def test_schema_fuzzing_finds_no_server_error(server) -> None:
    before = probe(server)
    stats = fuzz(server.base_url.removesuffix("/v1"), AUTH, max_examples=4, seed=1)
    assert stats.failures == []
    assert stats.cases >= 25 and len(stats.statuses) > 2  # valid and invalid requests both went in
    assert probe(server) == pytest.approx(before, abs=1e-6)


def test_oversized_bodies_get_413(server, session_path) -> None:
    big = json.dumps({"prompt": "x" * (Limits().max_body_bytes + 10)}).encode()
    for path in post_routes(session_path):
        declared = httpx.post(server.base_url + path, headers=JSON, content=big)
        chunked = httpx.post(server.base_url + path, headers=JSON, content=iter([big[:500_000], big[500_000:]]))
        for r in (declared, chunked):
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", (path, r.text[:200])


@pytest.mark.parametrize("depth", [1_000, 100_000, 300_000])
def test_deeply_nested_json_is_refused_in_openai_shape(server, session_path, depth) -> None:
    for path in post_routes(session_path):
        for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
            body = b'{"prompt": "x", "merge": ' + opener * depth + b"1" * (opener == b'{"a":') + closer * depth + b"}"
            r = httpx.post(server.base_url + path, headers=JSON, content=body, timeout=60)
            assert 400 <= r.status_code < 500 and "error" in r.json(), (path, depth, r.status_code)


@pytest.mark.parametrize("field", ["weights", "densities", "scale"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_coefficients_are_refused(server, field, value) -> None:
    merge = {"method": "evo", "experts": ["math"], "weights": [1.0], "densities": [1.0], "scale": 1.0}
    raw = json.dumps(merge).replace(json.dumps({field: merge[field]})[1:-1],
                                    f'"{field}": ' + (f"[{value}]" if field != "scale" else value))
    body = '{"prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 0, "merge": ' + raw + "}"
    r = httpx.post(server.base_url + "/completions", headers=JSON, content=body)
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"], (raw, r.text)


@pytest.mark.parametrize("coefficients", ['{"alpha": [NaN]}', '{"beta": [Infinity]}', '{"beta": [-1e400]}',
                                          '{"alpha": [0.5], "beta": [NaN]}'])
def test_non_finite_session_coefficients_are_refused(server, session_path, coefficients) -> None:
    r = httpx.post(server.base_url + session_path, headers=JSON, content=coefficients)
    assert r.status_code == 422, r.text


def test_unknown_experts_and_models_are_refused(server, session_path) -> None:
    base = server.base_url
    stranger = {"method": "evo", "experts": ["math", "nobody"], "weights": [1.0, 1.0]}
    cases = [("/completions", {"prompt": "x", "merge": stranger}, 422),
             ("/completions", {"prompt": "x", "model": "nobody"}, 404),
             ("/completions", {"prompt": "x", "model": "../../etc/passwd"}, 404),
             ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "merge": stranger}, 422),
             ("/sessions", {"experts": ["nobody"], "examples": EXAMPLES}, 422),
             (session_path, {"merge": {"method": "evo", "experts": ["colour"], "weights": [1.0]}}, 422),
             ("/sessions/sess-nonexistent/evaluate", {}, 404)]
    for path, body, status in cases:
        r = httpx.post(base + path, headers=AUTH, json=body)
        assert r.status_code == status and r.json()["error"]["message"], (path, r.text)


def test_a_seed_beyond_64_bits_is_a_422_not_a_crash(server) -> None:
    for path, body in (("/completions", {"prompt": "x", "max_tokens": 2}),
                       ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
        r = httpx.post(server.base_url + path, headers=AUTH, json={**body, "seed": 2**64})
        assert r.status_code == 422 and r.json()["error"]["param"] == "seed", r.text


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Bearer {API_KEY[:-1]}", f"Bearer {API_KEY}x",
                                  f"Basic {API_KEY}", API_KEY, "Bearer"],
                         ids=["missing", "wrong", "prefix", "longer", "basic", "no-scheme", "empty"])
def test_wrong_or_missing_keys_get_401_without_echoing_the_key(server, session_path, auth) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    calls = [("GET", "/models"), ("GET", "/stats"), ("POST", "/completions"), ("POST", "/chat/completions"),
             ("POST", "/sessions"), ("POST", session_path), ("DELETE", session_path.removesuffix("/evaluate"))]
    for method, path in calls:
        r = httpx.request(method, server.base_url + path, headers=headers, json={"prompt": "x"},
                          params={"api_key": API_KEY})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.status_code)
        assert API_KEY not in r.text
    schema = httpx.get(server.base_url.removesuffix("/v1") + "/openapi.json", headers=headers)
    assert schema.status_code == 401


def test_the_server_still_answers_correctly_after_the_abuse(server, host) -> None:
    from evomerge.recipe import MergeRecipe

    m = PROBE["merge"]
    host.activate(host.merge(MergeRecipe.from_dict(m)))
    expected = host.score([PROBE["prompt"]])[0].token_logprobs
    host.activate(None)
    assert probe(server) == pytest.approx(expected, abs=1e-4)
