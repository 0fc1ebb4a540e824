"""Merges registered as provider models answer as their recipe in the body does, across a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import evomerge
from evomerge.cli import main
from evomerge.search_spaces import build_space
from tests.helpers.provider import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
RECIPE = {"method": "evo_tv", "experts": ["math", "colour"], "weights": [0.9, -0.6], "densities": [0.7, 1.0]}
PROMPT = "Question: what colour is the sky? Answer:"


def start(repo: Path, registry: Path) -> Any:
    from evomerge.serve.app import create_app
    from evomerge.serve.embedded import ServerThread, load_host
    from evomerge.serve.registry import ModelRegistry

    thread = ServerThread(create_app(load_host(repo), api_key=API_KEY, registry=ModelRegistry(registry)))
    thread.start()
    return thread


def answers(url: str, body: dict[str, Any]) -> tuple[Any, str]:
    """Echoed prompt logprobs plus greedy continuation (completions), and the chat reply."""
    done = httpx.post(url + "/completions", headers=AUTH, json={"prompt": PROMPT, "max_tokens": 6, "echo": True,
                                                               "logprobs": 0, "temperature": 0, **body})
    chat = httpx.post(url + "/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0, **body})
    assert done.status_code == 200 and chat.status_code == 200, done.text + chat.text
    choice = done.json()["choices"][0]
    return (choice["text"], choice["logprobs"]["token_logprobs"]), chat.json()["choices"][0]["message"]["content"]


def test_a_registered_merge_answers_as_its_recipe_before_and_after_a_restart(tiny_repo, tmp_path):
    registry = tmp_path / "registered_models.json"
    server = start(tiny_repo, registry)
    try:
        url = server.base_url
        made = httpx.post(url + "/models", headers=AUTH, json={"id": "sky-merge", "merge": RECIPE})
        assert made.status_code == 200 and made.json()["kind"] == "merge", made.text
        assert "sky-merge" in [m["id"] for m in httpx.get(url + "/models", headers=AUTH).json()["data"]]
        inline = answers(url, {"merge": RECIPE})
        assert answers(url, {"model": "sky-merge"}) == inline
        assert answers(url, {}) != inline   # the base answers otherwise: the merge is what answers
    finally:
        server.stop()
    assert "weights" in registry.read_text() and "lora" not in registry.read_text()   # the recipe only
    server = start(tiny_repo, registry)
    try:
        url = server.base_url
        assert answers(url, {"model": "sky-merge"}) == inline
        assert httpx.delete(url + "/models/sky-merge", headers=AUTH).json()["deleted"] is True
        gone = httpx.post(url + "/completions", headers=AUTH, json={"model": "sky-merge", "prompt": "x", "max_tokens": 1})
        assert gone.status_code == 404
        assert httpx.delete(url + "/models/sky-merge", headers=AUTH).status_code == 404
        assert "sky-merge" not in [m["id"] for m in httpx.get(url + "/models", headers=AUTH).json()["data"]]
    finally:
        server.stop()


@pytest.mark.parametrize("method, path, body, status", [
    ("post", "/models", {"id": "m", "merge": RECIPE}, 401),
    ("delete", "/models/m", None, 401),
    ("get", "/models", None, 401),
])
def test_registration_needs_the_key(server, method, path, body, status):
    reply = httpx.request(method, server.base_url + path, json=body)
    assert reply.status_code == status


@pytest.mark.parametrize("body, status, words", [
    ({"id": "math", "merge": RECIPE}, 409, "already exists"),
    ({"id": "bad id!", "merge": RECIPE}, 422, "letters, digits"),
    ({"id": "m2", "merge": {**RECIPE, "experts": ["math", "nobody"]}}, 422, "nobody"),
    ({"id": "m3", "merge": {**RECIPE, "weights": [9.0, 0.0]}}, 422, "weights"),
])
def test_bad_registrations_are_refused(server, body, status, words):
    reply = httpx.post(server.base_url + "/models", headers=AUTH, json=body)
    assert reply.status_code == status and words in reply.json()["error"]["message"], reply.text


def test_export_registers_the_best_recipe(fresh_server, tmp_path, monkeypatch, capsys):
    journal = tmp_path / "run.sqlite"
    result = evomerge.search(lambda r: abs(r.weights[0] - 0.4), build_space("task_arithmetic", ["math", "colour"]),
                             budget=3, journal=journal)
    monkeypatch.setenv("PROVIDER_KEY", API_KEY)
    url = fresh_server.base_url
    assert main(["export", str(journal), "--out", str(tmp_path / "exp"), "--provider", url, "--name", "found",
                 "--api-key-env", "PROVIDER_KEY"]) == 0
    assert f"provider model: found at {url}" in capsys.readouterr().out
    assert answers(url, {"model": "found"}) == answers(url, {"merge": result.best_recipe.to_dict()})
    assert main(["export", str(journal), "--provider", url, "--name", "found", "--api-key-env", "PROVIDER_KEY"]) == 2
    assert "409" in capsys.readouterr().err
