"""`ApiBackend` against a real provider on 127.0.0.1 (and through a fault-injecting proxy)."""

from __future__ import annotations

import math
import pickle
import threading
import time
from dataclasses import replace

import pytest

from evomerge.backends.memo import ExampleMemo
from evomerge.backends.remote import ApiBackend, ApiEvaluatorFactory
from evomerge.errors import BackendError, ConfigError
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.serve.embedded import ServerThread
from evomerge.serve.protocol import answer_nll
from evomerge.spend import UsageCap
from evomerge.tasks import Example, Splits
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.provider import API_KEY, fresh_server, host, local_and_api, server, stats, tiny_repo  # noqa: F401

EXAMPLES = [Example(f"Question {i}: what colour is the sky? Answer:", [" blue", " grey", " four"][i % 3],
                    task=["sky", "math"][i % 2], id=f"e{i}") for i in range(10)]
RECIPE = MergeRecipe("evo", ("math", "colour", "french"), (0.9, -0.4, 0.3), (0.6, 1.0, 0.3))


@pytest.fixture()
def backend(server):
    b = ApiBackend(server.base_url, api_key=API_KEY, batch_size=4, backoff=0.01)
    yield b
    b.close()


def reference_losses(host, recipe: MergeRecipe, examples) -> list[float]:
    """The per-example loss computed on the host itself, with no HTTP in between."""
    host.activate(host.merge(recipe))
    scored = host.score([e.prompt + e.answer for e in examples])
    host.activate(None)
    return [answer_nll(s.tokens, s.token_logprobs, s.text_offset, e.prompt) for s, e in zip(scored, examples)]


def test_logprobs_mode_scores_answer_tokens_like_the_host(backend, host) -> None:
    score = backend.evaluate(RECIPE, EXAMPLES)
    assert score.ok, score.error
    expected = reference_losses(host, RECIPE, EXAMPLES)
    assert score.per_example["ce"] == pytest.approx(expected, abs=1e-4)
    assert score.loss == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert score.example_ids == tuple(e.id for e in EXAMPLES)
    other = backend.evaluate(MergeRecipe("evo", RECIPE.experts, (-0.9, 0.4, 0.3), RECIPE.densities), EXAMPLES)
    assert abs(other.loss - score.loss) > 1e-4


def test_session_mode_agrees_with_logprobs_mode(server, backend) -> None:
    session = ApiBackend(server.base_url, api_key=API_KEY, mode="session")
    try:
        a, b = backend.evaluate(RECIPE, EXAMPLES), session.evaluate(RECIPE, EXAMPLES)
        again = session.evaluate(replace(RECIPE, weights=(-0.9, 0.4, 0.3)), EXAMPLES)
    finally:
        session.close()
    assert b.ok and b.loss == pytest.approx(a.loss, abs=1e-5)
    assert (b.cost.queries, again.cost.queries) == (2, 1)  # the examples were uploaded once
    assert again.cost.tokens == a.cost.tokens  # the same text scored, the same tokens


def test_queries_and_tokens_are_counted_exactly(backend, host) -> None:
    score = backend.evaluate(RECIPE, EXAMPLES)
    assert score.cost.queries == math.ceil(len(EXAMPLES) / 4)
    assert score.cost.tokens == sum(host.count_tokens(e.prompt + e.answer) for e in EXAMPLES)
    assert backend.caps.queries == score.cost.queries and backend.caps.tokens == score.cost.tokens


def test_a_finish_after_a_minibatch_pays_only_for_the_rest(server, backend, host) -> None:
    """Racing's finish: the examples its minibatch scored are not queried again."""
    mini = backend.evaluate(RECIPE, EXAMPLES[:4])
    full = backend.evaluate(RECIPE, EXAMPLES)
    rest = EXAMPLES[4:]
    assert full.ok and full.cost.queries == math.ceil(len(rest) / 4)
    assert full.cost.tokens == sum(host.count_tokens(e.prompt + e.answer) for e in rest)
    assert full.per_example["ce"][:4] == mini.per_example["ce"]
    assert full.per_example["ce"] == pytest.approx(reference_losses(host, RECIPE, EXAMPLES), abs=1e-4)
    fresh = ApiBackend(server.base_url, api_key=API_KEY, batch_size=4)
    try:
        assert full.loss == pytest.approx(fresh.evaluate(RECIPE, EXAMPLES).loss, abs=1e-5)
    finally:
        fresh.close()
    assert backend.evaluate(RECIPE, EXAMPLES).cost.queries == 0  # every example known


def test_the_objective_aggregates_per_task(server) -> None:
    worst = ApiBackend(server.base_url, api_key=API_KEY, objective=Objective(aggregate="worst"))
    try:
        s = worst.evaluate(RECIPE, EXAMPLES)
    finally:
        worst.close()
    per = dict(zip(s.example_ids, s.per_example["ce"]))
    by_task = {t: [per[e.id] for e in EXAMPLES if e.task == t] for t in ("sky", "math")}
    assert s.loss == pytest.approx(max(sum(v) / len(v) for v in by_task.values()))
    assert s.metrics["loss/sky"] == pytest.approx(sum(by_task["sky"]) / len(by_task["sky"]))


def test_every_metric_matches_the_local_backend(server, tiny_repo) -> None:
    examples = [Example(f"Question {i}: colour? Answer:", c[i % 3], task="sky", id=f"c{i}", choices=c)
                for i, c in enumerate([(" blue", " grey", " four")] * 6)]
    objective = Objective(metric={"ce": 1.0, "accuracy": 1.0, "exact_match": 0.5, "f1": 0.5}, aggregate="normalized")
    b, a = local_and_api(tiny_repo, server.base_url, objective, examples, RECIPE, max_new_tokens=4)
    for metric in ("ce", "accuracy", "exact_match", "f1"):
        assert a.per_example[metric] == pytest.approx(b.per_example[metric], abs=1e-4), metric
    assert a.loss == pytest.approx(b.loss, abs=1e-4)
    # ce: 2 queries, accuracy: 18 pairs in 5, generation: 2, and as much again for the base's references
    assert a.cost.queries == 2 * (2 + 5 + 2)


def test_a_shared_cap_is_never_exceeded_across_threads(server) -> None:
    caps = UsageCap(max_queries=7, max_tokens=10_000)
    b = ApiBackend(server.base_url, api_key=API_KEY, batch_size=4, caps=caps)
    b.memo = ExampleMemo(recipes=0)  # every evaluation of RECIPE queries again
    before = stats(server)["queries"]
    scores = []
    try:
        threads = [threading.Thread(target=lambda: scores.append(b.evaluate(RECIPE, EXAMPLES))) for _ in range(5)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        b.close()
    served = stats(server)["queries"] - before
    assert caps.queries <= 7
    assert sum(s.cost.queries for s in scores) == caps.queries
    assert served == caps.queries  # what the provider answered is what was counted
    assert any(not s.ok and "BudgetExhausted" in s.error for s in scores)
    exact = UsageCap(max_queries=3)
    e = ApiBackend(server.base_url, api_key=API_KEY, batch_size=4, caps=exact)
    e.memo = ExampleMemo(recipes=0)
    try:
        assert e.evaluate(RECIPE, EXAMPLES).ok and exact.exhausted  # 3 chunks: exactly the cap
        assert "BudgetExhausted" in e.evaluate(RECIPE, EXAMPLES[:1]).error
    finally:
        e.close()
    token_cap = UsageCap(max_tokens=150)
    t = ApiBackend(server.base_url, api_key=API_KEY, batch_size=2, caps=token_cap)
    t.memo = ExampleMemo(recipes=0)
    try:
        for _ in range(3):
            t.evaluate(RECIPE, EXAMPLES[:2])
    finally:
        t.close()
    assert token_cap.tokens <= 150


def test_retries_ride_out_scripted_faults(server) -> None:
    with FaultProxy(server.base_url, script=["500", "429", "drop", "truncate", "corrupt", "503"],
                    retry_after=0.3) as proxy:
        b = ApiBackend(proxy.base_url, api_key=API_KEY, batch_size=len(EXAMPLES), retries=6, backoff=0.01)
        try:
            start = time.perf_counter()
            score = b.evaluate(RECIPE, EXAMPLES)
            elapsed = time.perf_counter() - start
        finally:
            b.close()
    assert score.ok, score.error
    assert score.cost.queries == 3 and b.attempts == 7  # the truncated and corrupted answers were served too
    assert elapsed >= 0.6  # two Retry-After: 0.3 waits honoured
    assert {k: proxy.counts[k] for k in ("500", "429", "drop", "truncate", "corrupt", "503", "ok")} == dict.fromkeys(
        ("500", "429", "drop", "truncate", "corrupt", "503", "ok"), 1)


def test_random_faults_at_30_percent_lose_nothing(server, backend) -> None:
    clean = backend.evaluate(RECIPE, EXAMPLES)
    rates = {"500": 0.06, "503": 0.06, "429": 0.06, "drop": 0.06, "truncate": 0.06}
    with FaultProxy(server.base_url, rates=rates, seed=3) as proxy:
        b = ApiBackend(proxy.base_url, api_key=API_KEY, batch_size=2, retries=10, backoff=0.005, max_backoff=0.05)
        b.memo = ExampleMemo(recipes=0)  # each of the four evaluations queries again
        try:
            scores = [b.evaluate(RECIPE, EXAMPLES) for _ in range(4)]
        finally:
            b.close()
    assert sum(proxy.counts[f] for f in rates) > 0
    assert all(s.ok and s.loss == pytest.approx(clean.loss, abs=1e-5) for s in scores)
    assert proxy.counts["ok"] == 4 * 5  # each chunk answered usably once
    assert sum(s.cost.queries for s in scores) == proxy.forwarded  # and every served request counted


def test_timeouts_are_retried(server) -> None:
    with FaultProxy(server.base_url, script=["delay"], delay=1.5) as proxy:
        b = ApiBackend(proxy.base_url, api_key=API_KEY, batch_size=len(EXAMPLES), timeout=0.5, backoff=0.01)
        try:
            score = b.evaluate(RECIPE, EXAMPLES)
        finally:
            b.close()
    assert score.ok and b.attempts == 2


def test_a_candidate_failing_after_retries_is_a_failed_score_and_the_next_one_runs(server) -> None:
    with FaultProxy(server.base_url, script=["503"] * 3, retry_after=0.0) as proxy:
        b = ApiBackend(proxy.base_url, api_key=API_KEY, batch_size=len(EXAMPLES), retries=2, backoff=0.01)
        try:
            failed, ok = b.evaluate(RECIPE, EXAMPLES), b.evaluate(RECIPE, EXAMPLES)
        finally:
            b.close()
    assert not failed.ok and "503" in failed.error and failed.cost.queries == 0
    assert ok.ok and ok.cost.queries == 1


def test_a_rejected_recipe_fails_without_retrying(backend) -> None:
    score = backend.evaluate(MergeRecipe("evo", ("math", "nobody"), (1.0, 1.0)), EXAMPLES)
    assert not score.ok and "422" in score.error and "nobody" in score.error
    assert backend.attempts == math.ceil(len(EXAMPLES) / 4) or backend.attempts <= 3


def test_concurrency_is_bounded_and_held(server) -> None:
    with FaultProxy(server.base_url, rates={"delay": 1.0}, delay=0.2) as proxy:
        b = ApiBackend(proxy.base_url, api_key=API_KEY, batch_size=1, concurrency=4)
        try:
            score = b.evaluate(RECIPE, EXAMPLES)
        finally:
            b.close()
    assert score.ok and b.max_in_flight == 4


def test_preflight_names_what_is_wrong(server, backend) -> None:
    backend.check()  # a good provider passes
    with pytest.raises(BackendError, match="401"):
        ApiBackend(server.base_url, api_key="wrong").check()
    with pytest.raises(BackendError, match="cannot reach"):
        ApiBackend("http://127.0.0.1:9/v1", retries=0).check()

    async def html(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": b"<html>hello</html>"})

    async def no_logprobs(scope, receive, send):
        body = (b'{"object":"list","data":[{"id":"base","object":"model"}]}' if scope["path"].endswith("/models")
                else b'{"id":"x","object":"text_completion","created":0,"model":"base",'
                     b'"choices":[{"index":0,"text":"hi","finish_reason":"length","logprobs":null}]}')
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    for app, match in ((html, "OpenAI-style JSON"), (no_logprobs, "without logprobs")):
        with ServerThread(app) as url:
            with pytest.raises(BackendError, match=match) as info:
                ApiBackend(url, retries=0).check()
            assert "\n" not in str(info.value)


def test_the_key_stays_out_of_repr_and_pickles(server, monkeypatch) -> None:
    monkeypatch.setenv("EVOMERGE_TEST_KEY", API_KEY)
    validation = tuple(replace(e, id=f"v{e.id}") for e in EXAMPLES[:3])  # not fit's own examples
    factory = ApiEvaluatorFactory(server.base_url, "EVOMERGE_TEST_KEY", Splits(tuple(EXAMPLES), validation, ()),
                                  options=(("batch_size", 5),))
    blob = pickle.dumps(factory)
    assert API_KEY.encode() not in blob
    evaluate = pickle.loads(blob)()
    fit, val = evaluate(RECIPE, "fit"), evaluate(RECIPE, "validation")
    assert fit.ok and val.ok and fit.cost.queries == 2 and val.cost.queries == 1
    b = ApiBackend(server.base_url, api_key_env="EVOMERGE_TEST_KEY")
    try:
        assert API_KEY not in repr(b) and API_KEY not in str(vars(b).get("caps"))
        assert b.evaluate(RECIPE, EXAMPLES[:1]).ok
    finally:
        b.close()


def test_a_search_runs_through_faults_with_every_evaluation_counted(server, monkeypatch) -> None:
    from evomerge import search
    from evomerge.search_spaces import build_space

    monkeypatch.setenv("EVOMERGE_TEST_KEY", API_KEY)
    splits = Splits(tuple(EXAMPLES[:6]), tuple(EXAMPLES[6:]), ())
    with FaultProxy(server.base_url, rates={"500": 0.1, "429": 0.1, "drop": 0.1}, seed=7, retry_after=0.0) as proxy:
        factory = ApiEvaluatorFactory(proxy.base_url, "EVOMERGE_TEST_KEY", splits,
                                      options=(("retries", 8), ("backoff", 0.005), ("batch_size", 6)))
        result = search(space=build_space("evo_joint", ["math", "colour", "french"]), evaluator=factory,
                        budget=12, seed=0, popsize=4, max_queries=400)
    paid = [t for t in result.trials if not t.cached]
    assert len([t for t in paid if t.split == "fit"]) == 12 and all(t.ok for t in paid)
    assert result.cost.queries == proxy.counts["ok"] <= 400
    assert sum(proxy.counts[f] for f in ("500", "429", "drop")) > 0


def test_greedy_match_comes_from_the_same_echoed_pass(server, host) -> None:
    from evomerge.serve.protocol import answer_greedy

    prompts = [e.prompt for e in EXAMPLES[:4]]
    host.activate(host.merge(RECIPE))
    continuations = host.generate(prompts, max_tokens=2, temperature=0.0, seed=None)
    host.activate(None)
    examples = EXAMPLES[:4] + [Example(p, g.text, id=f"g{i}") for i, (p, g) in enumerate(zip(prompts, continuations))
                               if g.text.strip()]
    greedy = ApiBackend(server.base_url, api_key=API_KEY, batch_size=4, objective=Objective("greedy_match"))
    try:
        score = greedy.evaluate(RECIPE, examples)
    finally:
        greedy.close()
    assert score.ok, score.error
    assert score.cost.queries == math.ceil(len(examples) / 4)  # no generation requests
    host.activate(host.merge(RECIPE))
    scored = host.score([e.prompt + e.answer for e in examples], top=1)
    host.activate(None)
    expected = [answer_greedy(s.tokens, s.token_logprobs, s.top_logprobs, s.text_offset, e.prompt)
                for s, e in zip(scored, examples)]
    assert list(score.per_example["greedy_match"]) == expected
    assert expected[4:] and all(x == 1.0 for x in expected[4:])  # the model's own continuations are greedy


def test_the_stop_cross_entropy_is_refused_in_one_line(server) -> None:
    """A provider's echoed logprobs hold no probability of the answer's end: refused before any
    request, naming the metric that works."""
    with pytest.raises(ConfigError, match="cannot score 'ce_stop'.*use objective metric 'ce'"):
        ApiBackend(server.base_url, objective=Objective({"ce_stop": 1.0, "exact_match": 1.0}))
