"""The provider over real HTTP with the real `openai` client: recipes change answers, errors are clean."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest

from evomerge.recipe import MergeRecipe
from evomerge.serve.protocol import Limits
from tests.helpers.provider import API_KEY, start_server, stats

PROMPT = "Question: what colour is the sky? Answer: blue"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def echo_logprobs(c: openai.OpenAI, merge: dict | None = None, model: str = "base", prompt=PROMPT) -> list:
    extra = {"merge": merge} if merge is not None else None
    r = c.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=0, extra_body=extra)
    return r.choices[0].logprobs


def test_models_lists_base_and_every_expert(server) -> None:
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["base", "colour", "french", "math"]


def test_echo_logprobs_cover_the_prompt_in_openai_format(server) -> None:
    lp = echo_logprobs(client(server))
    assert "".join(lp.tokens) == PROMPT
    assert [PROMPT[o:o + len(t)] for t, o in zip(lp.tokens, lp.text_offset)] == lp.tokens
    assert lp.token_logprobs[0] is not None  # scored given BOS
    assert all(v < 0 for v in lp.token_logprobs)


def test_recipes_reach_the_server_and_change_logprobs(server) -> None:
    c = client(server)
    base = echo_logprobs(c).token_logprobs
    a = MergeRecipe("evo", ("math", "colour"), (0.8, -0.6), (1.0, 0.5)).to_dict()
    b = MergeRecipe("evo", ("math", "colour"), (0.8, 0.6), (1.0, 0.5)).to_dict()
    la, lb = echo_logprobs(c, a).token_logprobs, echo_logprobs(c, b).token_logprobs
    assert max(abs(x - y) for x, y in zip(base, la)) > 1e-3
    assert max(abs(x - y) for x, y in zip(la, lb)) > 1e-3  # a sign flip is a different model
    assert echo_logprobs(c, a).token_logprobs == pytest.approx(la, abs=1e-5)  # same recipe, same answer
    assert echo_logprobs(c).token_logprobs == pytest.approx(base, abs=1e-5)  # the base is restored


@pytest.mark.parametrize("method", ["evo", "evo_tv", "linear", "task_arithmetic", "ties", "dare", "uniform"])
def test_every_merge_method_is_served(server, method) -> None:
    c = client(server)
    merge = MergeRecipe(method, ("math", "french"), (1.2, 0.6), (0.5, 0.8), seed=0).to_dict()
    assert max(abs(x - y) for x, y in zip(echo_logprobs(c).token_logprobs, echo_logprobs(c, merge).token_logprobs)) > 1e-4


def test_naming_an_expert_as_model_equals_its_single_expert_merge(server) -> None:
    c = client(server)
    alone = echo_logprobs(c, model="french").token_logprobs
    merged = echo_logprobs(c, MergeRecipe("task_arithmetic", ("french",), (1.0,)).to_dict()).token_logprobs
    assert alone == pytest.approx(merged, abs=1e-5)
    with pytest.raises(openai.NotFoundError):
        echo_logprobs(c, model="no-such-model")


def test_greedy_generation_and_chat_depend_on_the_recipe(server) -> None:
    c = client(server)
    merge = {"merge": MergeRecipe("task_arithmetic", ("math", "french"), (1.5, 1.5)).to_dict()}
    texts = [c.completions.create(model="base", prompt="Question:", max_tokens=6, temperature=0, extra_body=e)
             for e in (None, merge, None)]
    assert texts[0].choices[0].text == texts[2].choices[0].text != texts[1].choices[0].text
    assert texts[0].usage.completion_tokens <= 6 and texts[0].usage.prompt_tokens == 2
    chat = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                     temperature=0, extra_body=merge)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 3


def test_usage_counts_prompt_tokens_exactly(server, host) -> None:
    prompts = [PROMPT, "Translate to French: cat => chat", "x"]
    r = client(server).completions.create(model="base", prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    assert r.usage.prompt_tokens == sum(host.count_tokens(p) for p in prompts)
    assert r.usage.total_tokens == r.usage.prompt_tokens and len(r.choices) == 3


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_requests_without_the_right_key_get_401(server, headers) -> None:
    for method, path in (("GET", "/models"), ("POST", "/completions"), ("GET", "/stats"), ("POST", "/sessions")):
        r = httpx.request(method, server.base_url + path, headers=headers, json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_oversized_bodies_get_413_and_the_server_goes_on(tiny_repo) -> None:
    small = start_server(tiny_repo, limits=Limits(max_body_bytes=4000))
    try:
        big = {"prompt": "x" * 5000, "max_tokens": 0}
        r = httpx.post(small.base_url + "/completions", headers=AUTH, json=big)
        assert r.status_code == 413
        chunked = httpx.post(small.base_url + "/completions", headers=AUTH,
                             content=iter([json.dumps(big).encode()[:3000], json.dumps(big).encode()[3000:]]))
        assert chunked.status_code == 413
        ok = httpx.post(small.base_url + "/completions", headers=AUTH, json={"prompt": "hello", "max_tokens": 0})
        assert ok.status_code == 200
    finally:
        small.stop()


@pytest.mark.parametrize("merge, param", [
    ({"method": "evo", "experts": ["math"], "weights": [2.0]}, "merge.weights[0]"),
    ({"method": "evo", "experts": ["nobody"], "weights": [1.0]}, "merge"),
    ({"method": "evo", "experts": ["math"], "weights": [1.0], "densities": [1.5]}, "merge"),
    ({"method": "evo", "experts": ["math", "colour"], "weights": [1.0]}, "merge"),
    ({"method": "magic", "experts": ["math"], "weights": [1.0]}, "merge"),
    ({"method": "evo", "experts": ["math"], "weights": [1.0], "scale": 100}, "merge.scale"),
    ({"experts": ["math"], "weights": [1.0]}, "merge"),
    ("not a recipe", "merge"),
])
def test_bad_recipes_get_422_naming_the_field(server, merge, param) -> None:
    r = httpx.post(server.base_url + "/completions", headers=AUTH,
                   json={"prompt": "x", "max_tokens": 0, "merge": merge})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_non_finite_coefficients_and_bad_fields_get_422(server) -> None:
    body = '{"prompt": "x", "max_tokens": 0, "merge": {"method": "evo", "experts": ["math"], "weights": [NaN]}}'
    r = httpx.post(server.base_url + "/completions", headers={**AUTH, "content-type": "application/json"}, content=body)
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"]
    for bad, param in (({"prompt": "x", "max_tokens": 10_000}, "max_tokens"), ({"prompt": ["x"] * 65}, "prompt"),
                       ({"prompt": 3}, "prompt"), ({"prompt": "x", "logprobs": 9}, "logprobs"), ({}, "prompt")):
        r = httpx.post(server.base_url + "/completions", headers=AUTH, json=bad)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (bad, r.text)


def test_hostile_bodies_never_take_the_server_down(server) -> None:
    before = echo_logprobs(client(server)).token_logprobs
    for content in (b"{", b"\xff\xfe", b"[" * 50_000 + b"]" * 50_000, b'{"prompt": "x", "merge": ' + b"[" * 900 + b"]" * 900 + b"}"):
        r = httpx.post(server.base_url + "/completions", headers={**AUTH, "content-type": "application/json"},
                       content=content)
        assert 400 <= r.status_code < 500, (content[:20], r.status_code)
    assert echo_logprobs(client(server)).token_logprobs == pytest.approx(before, abs=1e-6)


def test_openapi_schema_documents_every_route(server) -> None:
    paths = httpx.get(server.base_url.removesuffix("/v1") + "/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/sessions",
            "/v1/sessions/{session_id}/evaluate"} <= set(paths)


def test_concurrent_clients_with_distinct_recipes_each_get_their_own_answers(fresh_server, host) -> None:
    recipes = [MergeRecipe("evo", ("math", "colour", "french"), (w, 0.5, -0.5), (1.0, d, 0.5))
               for w in (-1.0, 0.3, 1.2) for d in (0.2, 0.9)]
    expected = []
    for r in recipes:  # the reference: the host alone, no server
        host.activate(host.merge(r))
        expected.append(host.score([PROMPT])[0].token_logprobs)
    host.activate(None)

    async def run() -> list:
        c = openai.AsyncOpenAI(base_url=fresh_server.base_url, api_key=API_KEY, max_retries=0)
        calls = [c.completions.create(model="base", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0,
                                      extra_body={"merge": recipes[i % len(recipes)].to_dict()}) for i in range(48)]
        out = await asyncio.gather(*calls)
        await c.close()
        return out

    answers = asyncio.run(run())
    for i, a in enumerate(answers):
        assert a.choices[0].logprobs.token_logprobs == pytest.approx(expected[i % len(recipes)], abs=1e-4)
    s = stats(fresh_server)
    assert s["distinct_recipes"] == len(recipes) and s["merges"] <= len(recipes)  # shared passes merge nothing
    assert s["forward_passes"] < 48  # requests shared forward passes


def test_distinct_recipes_arriving_together_share_forward_passes(fresh_server, host) -> None:
    """16 clients, each with its own low-rank recipe: served in fewer forwards than 16, without a
    merge, each answered as its recipe alone is (the host merged, no server)."""
    recipes = [MergeRecipe("evo_tv", ("math", "colour", "french"), (0.15 * i - 1.0, 0.5, -0.4), (1.0, 0.3, 0.7))
               for i in range(16)]
    expected = []
    for r in recipes:
        host.activate(host.merge(r))
        expected.append(host.score([PROMPT])[0].token_logprobs)
    host.activate(None)

    async def run() -> list:
        c = openai.AsyncOpenAI(base_url=fresh_server.base_url, api_key=API_KEY, max_retries=0)
        out = await asyncio.gather(*(c.completions.create(model="base", prompt=PROMPT, max_tokens=0, echo=True,
                                                           logprobs=0, extra_body={"merge": r.to_dict()})
                                     for r in recipes))
        await c.close()
        return out

    answers = asyncio.run(run())
    for a, e in zip(answers, expected):
        assert a.choices[0].logprobs.token_logprobs == pytest.approx(e, abs=1e-4)
    assert len({tuple(round(x, 5) for x in e[1:]) for e in expected}) == len(recipes)  # each answers differently
    s = stats(fresh_server)
    assert s["forward_passes"] < len(recipes) and s["merges"] < len(recipes)


def test_secrets_never_reach_logs(server, caplog, capfd) -> None:
    caplog.set_level("DEBUG")
    httpx.get(server.base_url + "/models", headers={"Authorization": "Bearer wrong"})
    httpx.post(server.base_url + "/completions", headers=AUTH, json={"prompt": "x", "merge": {"method": "bad"}})
    echo_logprobs(client(server))
    out, err = capfd.readouterr()
    assert API_KEY not in caplog.text and API_KEY not in out and API_KEY not in err
    assert math.isfinite(echo_logprobs(client(server)).token_logprobs[-1])
