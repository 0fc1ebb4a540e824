"""The api backend through llama.cpp's real server (xllamacpp) over the tiny zoo's GGUF export:
the same scores as the local backend, β-only searches whose journal matches what the server
counted, α refused in one line, and a server killed mid-search. Skipped without xllamacpp."""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Iterator

import pytest

import evomerge
from evomerge.backends.remote import ApiBackend, ApiEvaluatorFactory
from evomerge.journal import Journal
from evomerge.objectives import Objective
from evomerge.recipe import MergeRecipe
from evomerge.search_spaces import build_space
from evomerge.tasks import Splits, load_jsonl
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.llamacpp_server import LlamaServer, tiny_gguf  # noqa: F401 (fixture)

EXPERTS = ("first_letter", "upper", "last_letter")
OBJECTIVE = Objective({"ce": 1.0, "exact_match": 1.0, "greedy_match": 0.5}, "mean")


@pytest.fixture(scope="module")
def llama(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:  # noqa: F811
    with LlamaServer(tiny_gguf, tmp_path_factory.mktemp("llama") / "server.log") as server:
        yield server


def _examples(zoo: Path, task: str, split: str, n: int) -> list:
    return load_jsonl(zoo / "tasks" / task / f"{split}.jsonl", task=task)[:n]


def _splits(zoo: Path, fit: int = 8, validation: int = 4) -> Splits:
    search = _examples(zoo, "upper_first", "search", fit + validation)
    return Splits(tuple(search[:fit]), tuple(search[fit:]), ())


def test_llamacpp_scores_as_the_local_backend(tiny_zoo: Path, llama: LlamaServer) -> None:
    """Adapter scales are evo_tv's β: CE from grammar-forced logprobs and generated answers agree
    with the local merge (byte-level vocabulary: the same tokens)."""
    from evomerge.backends.local import LocalBackend

    examples = _examples(tiny_zoo, "first_letter", "test", 8)
    api = ApiBackend(llama.url, provider="auto", objective=OBJECTIVE, max_new_tokens=12)
    local = LocalBackend(tiny_zoo, objective=OBJECTIVE, max_new_tokens=12)
    try:
        api.check()
        assert api.provider == "llama.cpp" and set(EXPERTS) <= set(api.experts())
        for recipe in (MergeRecipe("evo_tv", ("upper", "first_letter"), (0.7, 0.4)),
                       MergeRecipe("task_arithmetic", ("upper", "first_letter"), (-0.3, 1.2))):
            remote, here = api.evaluate(recipe, examples), local.evaluate(recipe, examples)
            assert remote.ok and here.ok
            assert remote.per_example["ce"] == pytest.approx(here.per_example["ce"], abs=2e-3)
            for metric in ("exact_match", "greedy_match"):
                assert remote.per_example[metric] == here.per_example[metric], metric
            assert remote.cost.queries == 2 * len(examples)  # one forced answer and one generation each
    finally:
        api.close()


def test_llamacpp_refuses_keep_ratios_in_one_line(tiny_zoo: Path, llama: LlamaServer,
                                                  capsys: pytest.CaptureFixture) -> None:
    api = ApiBackend(llama.url, provider="llama.cpp", objective=OBJECTIVE, max_new_tokens=12)
    try:
        score = api.evaluate(MergeRecipe("evo_tv", EXPERTS[:2], (1.0, 0.5), densities=(0.5, 1.0)),
                             _examples(tiny_zoo, "upper", "test", 2))
    finally:
        api.close()
    assert score.status == "failed" and "α" in score.error and score.cost.queries == 0
    from evomerge.cli import main

    argv = ["search", "--backend", "api", "--api-base", llama.url, "--repository", str(tiny_zoo), "--budget", "8"]
    assert main(argv) == 2  # the default space, evo_joint, searches α too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp" in err[0] and "schedule: beta" in err[0]


def _search(zoo: Path, url: str, journal: Path, budget: int, max_queries: int | None = None,
            **options: object) -> evomerge.SearchResult:
    factory = ApiEvaluatorFactory(url, "NO_KEY", _splits(zoo), OBJECTIVE,
                                  options=(("provider", "llama.cpp"), ("max_new_tokens", 12), *options.items()))
    return evomerge.search(space=build_space("evo_joint", list(EXPERTS), schedule="beta"), evaluator=factory,
                           budget=budget, seed=0, journal=journal, workers=2, max_queries=max_queries)


def test_search_through_llamacpp_matches_the_servers_count(tiny_zoo: Path, llama: LlamaServer,
                                                           tmp_path: Path) -> None:
    """30 paid evaluations; every completion the server answered is in the journal's queries, and its
    own token counters equal the journal's tokens."""
    before = llama.metrics()
    with FaultProxy(llama.url) as proxy:
        result = _search(tiny_zoo, proxy.base_url, tmp_path / "run.sqlite", budget=30)
        completions = proxy.routes["POST /v1/completions"]
    after = llama.metrics()
    with Journal.open(tmp_path / "run.sqlite") as journal:
        spent, open_ = journal.totals(), journal.outstanding()
    rows = sqlite3.connect(tmp_path / "run.sqlite").execute(
        "SELECT split, status FROM evaluations WHERE cached = 0").fetchall()
    assert sum(1 for split, _ in rows if split == "fit") == 30 and all(s == "ok" for _, s in rows)
    assert open_.queries == 0 and spent.queries == completions > 30
    served = sum(after[k] - before[k] for k in ("prompt_tokens_total", "tokens_predicted_total"))
    assert spent.tokens == served and after["prompt_tokens_cached_total"] == before["prompt_tokens_cached_total"]
    assert all(w == 0.0 or abs(w) <= 1.5 for w in result.best_recipe.weights) and result.best_recipe.densities in (
        None, (1.0,) * len(EXPERTS))


def test_query_cap_through_llamacpp_is_never_passed(tiny_zoo: Path, llama: LlamaServer, tmp_path: Path) -> None:
    """The spend ledger reserves each evaluation's worst case (llama.cpp's bound: one request per
    answer decoded and per generation) before sending: the cap stops the search, never the server."""
    with FaultProxy(llama.url) as proxy:
        _search(tiny_zoo, proxy.base_url, tmp_path / "run.sqlite", budget=30, max_queries=150)
        completions = proxy.routes["POST /v1/completions"]
    with Journal.open(tmp_path / "run.sqlite") as journal:
        spent = journal.totals().queries + journal.outstanding().queries
    assert 0 < completions == spent <= 150


def _fit_rows(journal: Path, status: str | None = None) -> int:
    """Fit evaluations (of `status`, if given) the journal holds so far (0 before it exists)."""
    if not journal.exists():
        return 0
    query = "SELECT COUNT(*) FROM evaluations WHERE split = 'fit'" + (" AND status = ?" if status else "")
    try:
        with closing(sqlite3.connect(journal, timeout=1.0)) as db:
            return int(db.execute(query, (status,) if status else ()).fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not written yet
        return 0


def test_server_killed_mid_search_fails_candidates_and_the_search_finishes(tiny_zoo: Path, tiny_gguf: Path,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    server = LlamaServer(tiny_gguf, tmp_path / "server.log").start()
    done: list[evomerge.SearchResult] = []
    journal = tmp_path / "run.sqlite"
    # A candidate fails only after a retry 1-2 s on (jitter), so the 27 left cannot all fail while the server
    # restarts (a few seconds: a Python process and the model load).
    search = threading.Thread(target=lambda: done.append(_search(
        tiny_zoo, server.url, journal, budget=30, retries=1, backoff=2.0, max_backoff=2.0)))
    try:
        search.start()
        while _fit_rows(journal) < 3 and search.is_alive():  # a few evaluations in, most to come
            time.sleep(0.02)
        server.kill()
        while _fit_rows(journal, "failed") == 0 and search.is_alive():  # a candidate failed against it
            time.sleep(0.02)
        server.start()
        search.join(timeout=300)
    finally:
        server.kill()
    assert done, "the search did not finish"
    rows = sqlite3.connect(journal).execute(
        "SELECT status, error FROM evaluations WHERE split = 'fit' AND cached = 0 ORDER BY seq").fetchall()
    assert len(rows) == 30
    failed = [i for i, (status, _) in enumerate(rows) if status == "failed"]
    assert failed and all("attempts" in rows[i][1] or "Connection" in rows[i][1] for i in failed)
    assert rows[-1][0] == "ok" and failed[0] > 0  # evaluations before the kill and after the restart


def test_forced_answers_spell_any_text(llama: LlamaServer) -> None:
    """Quotes, backslashes, tabs and UTF-8 in an answer reach the grammar intact (a wrong escape
    makes the server refuse the grammar or spell something else, and the score fails)."""
    from evomerge.tasks import Example

    odd = [Example("Say it:", ' "a\\b"\tcafé\x08', task="t", id="odd"), Example("Then ", "}{::=", task="t", id="gbnf")]
    api = ApiBackend(llama.url, provider="llama.cpp", objective=Objective("ce", "mean"))
    try:
        score = api.evaluate(MergeRecipe("evo_tv", ("upper",), (0.5,)), odd)
    finally:
        api.close()
    assert score.ok and all(v > 0 for v in score.per_example["ce"])


def test_profile_rules_without_a_server() -> None:
    from evomerge.backends.llamacpp import adapter_ids, lora_field, space_error
    from evomerge.errors import BackendError

    ids = adapter_ids([{"id": 0, "path": "/x/experts/upper.gguf"}, {"id": 1, "path": "C:\\z\\plural.gguf"}])
    assert ids == {"upper": 0, "plural": 1}
    with pytest.raises(BackendError, match="two adapters named"):
        adapter_ids([{"id": 0, "path": "a/upper.gguf"}, {"id": 1, "path": "b/upper.gguf"}])
    recipe = MergeRecipe("linear", ("upper", "plural"), (3.0, 1.0), scale=2.0)
    assert lora_field(recipe, ids) == [{"id": 0, "scale": 1.5}, {"id": 1, "scale": 0.5}]
    with pytest.raises(BackendError, match="no adapter named 'last'"):
        lora_field(MergeRecipe("evo_tv", ("last",), (1.0,)), ids)
    with pytest.raises(BackendError, match="method 'ties'"):
        lora_field(MergeRecipe("ties", ("upper",), (1.0,), densities=(1.0,)), ids)
    assert space_error("evo_joint", {"schedule": "beta"}) is None and space_error("task_arithmetic", {}) is None
    for name, options in (("evo_joint", {}), ("evo", {"schedule": "beta"}), ("blockwise", {}),
                          ("evo_joint", {"schedule": "beta", "refine_groups": 2})):
        assert "schedule: beta" in space_error(name, options), name
