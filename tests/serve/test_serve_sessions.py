"""The merge-session API: examples uploaded once, then (α, β) in, loss out."""

from __future__ import annotations

import httpx
import pytest

from evomerge.recipe import MergeRecipe
from evomerge.serve.protocol import answer_nll
from tests.helpers.provider import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = [{"prompt": f"Question {i}: sky? Answer:", "answer": " blue", "id": f"x{i}"} for i in range(5)]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, headers=AUTH, json=body)


def test_a_session_returns_the_loss_of_each_alpha_beta(server, host) -> None:
    s = post(server, "/sessions", {"experts": ["math", "french"], "examples": EXAMPLES}).json()
    assert s["examples"] == 5 and s["tokens_per_evaluation"] > 0
    r = post(server, f"/sessions/{s['id']}/evaluate", {"alpha": [0.5, 1.0], "beta": [1.2, -0.7]}).json()
    recipe = MergeRecipe("evo", ("math", "french"), (1.2, -0.7), (0.5, 1.0))
    host.activate(host.merge(recipe))
    scored = host.score([e["prompt"] + e["answer"] for e in EXAMPLES])
    host.activate(None)
    expected = [answer_nll(x.tokens, x.token_logprobs, x.text_offset, e["prompt"]) for x, e in zip(scored, EXAMPLES)]
    assert r["per_example"] == pytest.approx(expected, abs=1e-4)
    assert r["loss"] == pytest.approx(sum(expected) / 5, abs=1e-4)
    assert r["example_ids"] == [e["id"] for e in EXAMPLES] and r["recipe_key"] == recipe.key()
    default = post(server, f"/sessions/{s['id']}/evaluate", {}).json()  # α = 1, β = 1/N
    uniform = post(server, f"/sessions/{s['id']}/evaluate", {"merge": MergeRecipe(
        "evo", ("math", "french"), (0.5, 0.5), (1.0, 1.0)).to_dict()}).json()
    assert default["loss"] == pytest.approx(uniform["loss"], abs=1e-6) != pytest.approx(r["loss"], abs=1e-4)


@pytest.mark.parametrize("body, param", [
    ({"alpha": [0.5], "beta": [1.0, 1.0]}, "alpha"),
    ({"beta": [2.0, 0.0]}, "beta"),
    ({"alpha": [1.5, 0.0]}, "alpha"),
    ({"merge": {"method": "evo", "experts": ["colour"], "weights": [1.0]}}, "merge.experts"),
])
def test_bad_session_queries_get_422(server, body, param) -> None:
    s = post(server, "/sessions", {"experts": ["math", "french"], "examples": EXAMPLES}).json()
    r = post(server, f"/sessions/{s['id']}/evaluate", body)
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_sessions_refuse_unknown_experts_and_vanish_when_closed(server) -> None:
    assert post(server, "/sessions", {"experts": ["nobody"], "examples": EXAMPLES}).status_code == 422
    assert post(server, "/sessions", {"experts": ["math"], "examples": []}).status_code == 422
    s = post(server, "/sessions", {"experts": ["math"], "examples": EXAMPLES}).json()
    assert httpx.delete(server.base_url + f"/sessions/{s['id']}", headers=AUTH).status_code == 200
    assert post(server, f"/sessions/{s['id']}/evaluate", {}).status_code == 404
