"""The provider's answers validate against OpenAI's published response schemas: the `openai`
package's models (generated from OpenAI's OpenAPI spec), strictly, and with every field the spec
marks required present, even where it is null (the models give those a default)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from tests.helpers.provider import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REQUIRED = {
    "ChatCompletion": {"id", "choices", "created", "model", "object"},
    "Choice": {"finish_reason", "index", "logprobs", "message"},
    "ChatCompletionMessage": {"content", "refusal", "role"},
    "ChoiceLogprobs": {"content", "refusal"},
    "ChatCompletionTokenLogprob": {"token", "logprob", "bytes", "top_logprobs"},
    "TopLogprob": {"token", "logprob", "bytes"},
    "CompletionUsage": {"prompt_tokens", "completion_tokens", "total_tokens"},
    "Completion": {"id", "choices", "created", "model", "object"},
    "CompletionChoice": {"finish_reason", "index", "logprobs", "text"},
}
"""Required fields of each object, from OpenAI's OpenAPI spec (CreateChatCompletionResponse,
CreateCompletionResponse and the objects they hold)."""


def missing_required(model: BaseModel, where: str = "") -> list[str]:
    """Spec-required fields absent from the JSON `model` was validated from, anywhere in the tree."""
    name = type(model).__name__
    gaps = [f"{where or name}.{f}" for f in sorted(REQUIRED.get(name, set()) - model.model_fields_set)]
    for field in model.model_fields_set:
        value = getattr(model, field)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                gaps += missing_required(item, f"{where or name}.{field}[{i}]")
    return gaps


def answer(server: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


CHAT = {"model": "base", "messages": [{"role": "user", "content": "What colour is the sky?"}], "max_tokens": 4,
        "temperature": 0}


@pytest.mark.parametrize("options", [{}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 3}],
                         ids=["plain", "logprobs", "top_logprobs"])
def test_chat_completions_validate_against_openai_schema(server, options) -> None:
    data = answer(server, "/chat/completions", {**CHAT, **options})
    chat = ChatCompletion.model_validate(data, strict=True)
    assert missing_required(chat) == []
    choice = chat.choices[0]
    assert choice.message.refusal is None and choice.message.role == "assistant"
    if not options:
        assert choice.logprobs is None
        return
    assert choice.logprobs is not None and choice.logprobs.content
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    asked = options.get("top_logprobs", 0)
    for t in choice.logprobs.content:  # the alternatives: the most likely tokens, best first, as many as asked
        values = [a.logprob for a in t.top_logprobs]  # (fewer where byte pieces decode alike, as OpenAI allows)
        assert 0 < len(values) <= asked if asked else values == []
        assert values == sorted(values, reverse=True) and (not values or t.logprob <= values[0] + 1e-5)
    if asked:
        assert max(len(t.top_logprobs) for t in choice.logprobs.content) == asked


def test_scoring_a_final_assistant_message_validates_too(server) -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "What colour is the sky?"},
                                          {"role": "assistant", "content": " blue"}],
            "max_tokens": 0, "logprobs": True, "top_logprobs": 1, "echo": True, "continue_final_message": True,
            "add_generation_prompt": False}
    chat = ChatCompletion.model_validate(answer(server, "/chat/completions", body), strict=True)
    assert missing_required(chat) == [] and chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize("options", [{"max_tokens": 4}, {"max_tokens": 0, "echo": True, "logprobs": 2},
                                     {"max_tokens": 3, "logprobs": 1}], ids=["generate", "echo", "generate-logprobs"])
def test_completions_validate_against_openai_schema(server, options) -> None:
    body = {"model": "base", "prompt": ["Question: what colour is the sky? Answer:", "Question:"],
            "temperature": 0, **options}
    completion = Completion.model_validate(answer(server, "/completions", body), strict=True)
    assert missing_required(completion) == [] and [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        if "logprobs" in options:
            lp = choice.logprobs
            assert lp is not None and lp.tokens and len(lp.top_logprobs or []) == len(lp.tokens)
            assert all(len(top) <= options["logprobs"] for top in lp.top_logprobs or [])
        generated = completion.usage.completion_tokens if completion.usage else 0
        assert choice.finish_reason in ("stop", "length") and (generated or choice.finish_reason == "length")
