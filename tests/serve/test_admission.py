"""What the provider refuses before model work (long prompts, keys over their tokens per minute) and
the deadline that frees the model from a request nobody waits for; /tokenize counts as usage does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from evomerge.serve.protocol import Limits
from tests.helpers.provider import API_KEY, start_server, stats

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_PROMPT = 40
TPM = 600
DEADLINE = 0.5


@pytest.fixture(scope="module")
def limited(tiny_repo: Path) -> Iterator[Any]:
    """A provider with a 40-token prompt limit, 600 tokens per minute per key and a 0.5 s deadline;
    auth off, so each test's bearer token is a key of its own."""
    thread = start_server(tiny_repo, api_key=None, limits=Limits(max_prompt_tokens=MAX_PROMPT, tokens_per_minute=TPM,
                                                   deadline=DEADLINE))
    yield thread
    thread.stop()


def post(server: Any, path: str, body: dict[str, Any], key: str = API_KEY) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_models_state_the_prompt_limit(limited, server, host) -> None:
    assert {m["max_prompt_tokens"] for m in httpx.get(limited.base_url + "/models", headers=AUTH).json()["data"]} \
        == {MAX_PROMPT}
    default = httpx.get(server.base_url + "/models", headers=AUTH).json()["data"]
    assert {m["max_prompt_tokens"] for m in default} == {host.context_length} == {128}


@pytest.mark.parametrize("chars", [120_000, 400])
def test_a_long_prompt_is_refused_before_model_work_in_openai_shape(limited, chars) -> None:
    before = stats(limited)
    with httpx.Client(base_url=limited.base_url, headers=AUTH, timeout=60) as c:
        c.get("/models")  # the connection is open: the timing below is the server's
        started = time.perf_counter()
        r = c.post("/completions", json={"prompt": "sky " * (chars // 4), "max_tokens": 0, "echo": True,
                                         "logprobs": 0})
        took = time.perf_counter() - started
    assert r.status_code == 400 and took < 0.05, (r.status_code, took)
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": "prompt", "code": "context_length_exceeded"}}
    assert f"at most {MAX_PROMPT} tokens" in r.json()["error"]["message"]
    assert stats(limited)["jobs"] == before["jobs"]  # the model worker never saw it


def test_every_paid_route_applies_the_prompt_limit(limited) -> None:
    long = "sky " * 30
    chat = post(limited, "/chat/completions", {"messages": [{"role": "user", "content": long}], "max_tokens": 1})
    batch = post(limited, "/completions", {"prompt": ["sky", long], "max_tokens": 0, "echo": True, "logprobs": 0})
    session = post(limited, "/sessions", {"experts": ["math"], "examples": [{"prompt": long, "answer": " blue"}]})
    assert (chat.status_code, chat.json()["error"]["param"]) == (400, "messages")
    assert (batch.status_code, batch.json()["error"]["param"]) == (400, "prompt[1]")
    assert (session.status_code, session.json()["error"]["param"]) == (400, "examples[0]")
    assert post(limited, "/completions", {"prompt": "sky " * 5, "max_tokens": 0, "echo": True,
                                          "logprobs": 0}).status_code == 200


def test_a_key_over_its_tokens_per_minute_gets_429_with_retry_after(limited) -> None:
    body = {"prompt": "Question: what colour is the sky? Answer:", "max_tokens": 8, "temperature": 0}
    answered = []
    for _ in range(TPM // 10):
        r = post(limited, "/completions", body, key="busy")
        if r.status_code != 200:
            break
        answered.append(r.json()["usage"]["total_tokens"])
    assert r.status_code == 429 and sum(answered) <= TPM and answered, (r.status_code, answered)
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert post(limited, "/completions", body, key="idle").status_code == 200  # another key's minute is its own
    with pytest.raises(openai.RateLimitError):  # the openai client reads it as a rate limit
        openai.OpenAI(base_url=limited.base_url, api_key="busy", max_retries=0).completions.create(
            model="base", prompt=body["prompt"], max_tokens=8)
    too_big = post(limited, "/completions", {"prompt": ["sky"] * 4, "max_tokens": 256}, key="big")
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_too_large"


def test_a_request_past_its_deadline_gets_504_and_frees_the_model(tiny_repo) -> None:
    """Four generations of 64 prompts × 256 tokens take about 12 s each here; with a 0.5 s deadline
    each gets 504 at the deadline, the queued ones never run, and a short request is answered at once."""
    server = start_server(tiny_repo, limits=Limits(deadline=DEADLINE))

    async def run() -> tuple[list[int], float, int]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=60) as c:
            long = {"prompt": ["Question: x"] * 64, "max_tokens": 256, "temperature": 1.0, "seed": 1}
            started = time.perf_counter()
            answers = await asyncio.gather(*[c.post("/completions", json=long) for _ in range(4)])
            short = await c.post("/completions", json={"prompt": "Question:", "max_tokens": 2})
            return [r.status_code for r in answers] + [short.status_code], time.perf_counter() - started, \
                answers[0].json()["error"]["code"] if answers[0].status_code == 504 else ""

    try:
        statuses, took, code = asyncio.run(run())
        assert statuses == [504, 504, 504, 504, 200] and code == "deadline_exceeded"
        assert took < 4 * DEADLINE + 2, took
        assert stats(server)["queries"] == 1  # only the short one was served
    finally:
        server.stop()


def test_tokenize_counts_as_usage_does_and_is_unpaid(server, host) -> None:
    root = server.base_url.removesuffix("/v1")
    prompt = "Question: what colour is the sky? Answer: blue"
    before = stats(server)["queries"]
    r = httpx.post(root + "/tokenize", json={"prompt": prompt}, headers=AUTH)
    llama = httpx.post(root + "/tokenize", json={"content": prompt}, headers=AUTH)
    chat = httpx.post(root + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert r.status_code == llama.status_code == chat.status_code == 200
    assert r.json()["count"] == len(r.json()["tokens"]) == host.count_tokens(prompt) == llama.json()["count"]
    assert r.json()["max_model_len"] == 128 and chat.json()["count"] > 1
    assert stats(server)["queries"] == before
    assert httpx.post(root + "/tokenize", json={}, headers=AUTH).status_code == 422
    assert httpx.post(root + "/tokenize", json={"prompt": "x"}).status_code == 401
