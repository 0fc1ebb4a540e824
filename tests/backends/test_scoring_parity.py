"""The local backend and the api backend (through the real reference provider on 127.0.0.1 and
the real `openai` client) score the same tokens and generate the same answers: with a trained
byte-level BPE tokenizer, with prompts ending in a space, with answers longer than 16 tokens, and
with a chat template (``task.chat``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("peft")

from evomerge import inference  # noqa: E402
from evomerge.backends.remote import ApiBackend  # noqa: E402
from evomerge.backends.local import LocalBackend  # noqa: E402
from evomerge.errors import BackendError, TaskError  # noqa: E402
from evomerge.objectives import Objective  # noqa: E402
from evomerge.recipe import MergeRecipe  # noqa: E402
from evomerge.tasks import Example, generation_length  # noqa: E402
from evomerge.serve.app import create_app  # noqa: E402
from evomerge.serve.embedded import ServerThread, load_host  # noqa: E402
from tests.helpers.bpe import CHAT_TEMPLATE, EXPERTS, build_bpe_repository, train_full_expert  # noqa: E402
from tests.helpers.fault_proxy import FaultProxy  # noqa: E402
from tests.helpers.provider import API_KEY, local_and_api, start_server  # noqa: E402

RECIPE = MergeRecipe("evo", EXPERTS, (0.8, -0.5), (0.7, 1.0))
Q = "Question: what is the colour of {}? Answer:"
EXAMPLES = [Example(Q.format("ice"), " cold", id="space-in-answer"),
            Example(Q.format("ice") + " ", "cold", id="space-in-prompt"),  # the same scored tokens as the first
            Example(Q.format("fire"), "hot", id="no-space"),
            Example(Q.format("sea") + " ", "blue sky", id="two-words"),
            Example("Tell me:", " night and day", id="tell"),
            Example("Tell me the weather\nAnswer:", " warm rain", id="newline-in-prompt")]
CE_GREEDY = Objective({"ce": 1.0, "greedy_match": 1.0}, aggregate="mean")
EXACT = Objective({"exact_match": 1.0}, aggregate="mean")


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bpe_repository(tmp_path_factory.mktemp("bpe_plain"))


@pytest.fixture(scope="module")
def chat_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bpe_repository(tmp_path_factory.mktemp("bpe_chat"), CHAT_TEMPLATE)


def _serve(repo: Path) -> Iterator[str]:
    thread = start_server(repo)
    yield thread.base_url
    thread.stop()


@pytest.fixture(scope="module")
def plain_url(plain_repo: Path) -> Iterator[str]:
    yield from _serve(plain_repo)


@pytest.fixture(scope="module")
def chat_url(chat_repo: Path) -> Iterator[str]:
    yield from _serve(chat_repo)


def both(repo: Path, url: str, objective: Objective, examples: list[Example], recipe: MergeRecipe = RECIPE,
         **options: Any) -> tuple[Any, Any]:
    """The local and the api score of `recipe` on `examples`."""
    return local_and_api(repo, url, objective, examples, recipe, **options)


def greedy_answers(repo: Path, examples: list[Example], max_new_tokens: int | None = None,
                   chat: bool = False) -> list[str]:
    """What the local scorer generates for RECIPE (the gold answers of the exact-match checks)."""
    local = LocalBackend(repo, device="cpu")
    try:
        with local.engine.merged(RECIPE) as model:
            return inference.generate_answers(model, local.engine.tokenizer, examples, max_new_tokens, chat=chat)
    finally:
        local.close()


def tokenizer(repo: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(repo / "base")


def as_gold(examples: list[Example], answers: list[str]) -> list[Example]:
    gold = [Example(e.prompt, a, id=e.id) for e, a in zip(examples, answers) if a]
    assert len(gold) >= 3, answers
    return gold


def test_the_tokenizer_merges_across_the_boundary(plain_repo: Path) -> None:
    """The case the rule exists for: ids of prompt and answer apart differ from the scored string's."""
    tok = tokenizer(plain_repo)
    e = EXAMPLES[1]
    apart = tok(e.prompt)["input_ids"] + tok(e.answer, add_special_tokens=False)["input_ids"]
    ((ids, first),) = inference.encode(tok, [(e.prompt, e.answer)])
    assert ids != apart and tok.convert_ids_to_tokens(ids[first:]) == ["Ġcold"]
    assert inference.encode(tok, [(EXAMPLES[0].prompt, EXAMPLES[0].answer)]) == [(ids, first)]


def test_training_labels_are_the_scored_tokens_and_eos(plain_repo: Path) -> None:
    """Experts learn the format that is scored: labels on the answer tokens of the one string, then EOS."""
    tok = tokenizer(plain_repo)
    batch = inference.training_batch(tok, [(EXAMPLES[1].prompt, EXAMPLES[1].answer)])
    labels = [t for t in batch["labels"][0].tolist() if t != -100]
    assert tok.convert_ids_to_tokens(labels) == ["Ġcold", "</s>"]


def test_local_and_api_score_the_same_tokens(plain_repo: Path, plain_url: str) -> None:
    local, api = both(plain_repo, plain_url, CE_GREEDY, EXAMPLES)
    assert local.per_example["ce"] == pytest.approx(api.per_example["ce"], abs=1e-4)
    assert local.per_example["greedy_match"] == api.per_example["greedy_match"]
    ce = local.per_example["ce"]
    assert ce[0] == pytest.approx(ce[1], abs=1e-6)  # "Answer:" + " cold" is "Answer: " + "cold"
    assert len({round(v, 3) for v in ce}) == len(ce) - 1


def test_local_and_api_generate_the_same_answers(plain_repo: Path, plain_url: str) -> None:
    gold = as_gold(EXAMPLES, greedy_answers(plain_repo, EXAMPLES, generation_length(EXAMPLES)))
    local, api = both(plain_repo, plain_url, Objective({"exact_match": 1.0, "greedy_match": 1.0}, "mean"),
                      gold, max_new_tokens=generation_length(EXAMPLES))
    assert local.per_example["exact_match"] == api.per_example["exact_match"] == (1.0,) * len(gold)
    # what greedy decoding produced is what the teacher-forced pass calls greedy, on both sides
    assert local.per_example["greedy_match"] == api.per_example["greedy_match"]


def test_an_answer_longer_than_16_tokens_is_generated_whole(tmp_path: Path) -> None:
    """An expert trained to answer with 24 tokens (and stop): matched with the generation length
    derived from the answer, missed at the old fixed 16 tokens."""
    words = " blue sky cold sea warm rain white snow black night red fire green moon grey wind hot sun very cold ice"
    long = Example("Tell me the colours of the world:", words + " quite warm day", id="long")
    repo = train_full_expert(build_bpe_repository(tmp_path, spread=None), "long", [(long.prompt, long.answer)])
    assert len(tokenizer(repo)(long.answer, add_special_tokens=False)["input_ids"]) == 24
    recipe = MergeRecipe("task_arithmetic", ("long",), (1.0,))
    with ServerThread(create_app(load_host(repo), api_key=API_KEY)) as url:
        for length, expected in ((None, 1.0), (16, 0.0)):
            local, api = both(repo, url, EXACT, [long], recipe, max_new_tokens=length)
            assert local.per_example["exact_match"] == api.per_example["exact_match"] == (expected,)


def test_chat_scores_and_generates_alike_through_the_template(chat_repo: Path, chat_url: str) -> None:
    local, api = both(chat_repo, chat_url, CE_GREEDY, EXAMPLES, chat=True)
    assert local.per_example["ce"] == pytest.approx(api.per_example["ce"], abs=1e-4)
    assert local.per_example["greedy_match"] == api.per_example["greedy_match"]
    plain, _ = both(chat_repo, chat_url, CE_GREEDY, EXAMPLES)
    assert all(abs(c - p) > 1e-3 for c, p in zip(local.per_example["ce"], plain.per_example["ce"]))  # templated
    gold = as_gold(EXAMPLES, greedy_answers(chat_repo, EXAMPLES, generation_length(EXAMPLES), chat=True))
    local, api = both(chat_repo, chat_url, EXACT, gold, chat=True, max_new_tokens=generation_length(EXAMPLES))
    assert local.per_example["exact_match"] == api.per_example["exact_match"] == (1.0,) * len(gold)


def test_chat_without_a_template_is_refused_in_one_line(plain_repo: Path, plain_url: str) -> None:
    with pytest.raises(TaskError, match="task.chat") as local:
        LocalBackend(plain_repo, device="cpu", chat=True)
    api = ApiBackend(plain_url, api_key=API_KEY, chat=True, retries=0)
    try:
        with pytest.raises(BackendError, match="task.chat") as remote:
            api.check()
        failed = api.evaluate(RECIPE, EXAMPLES[:1])
    finally:
        api.close()
    assert "\n" not in str(local.value) and "\n" not in str(remote.value)
    assert not failed.ok and "chat template" in failed.error


def test_chat_logprobs_come_in_openais_shape(chat_url: str) -> None:
    import openai

    c = openai.OpenAI(base_url=chat_url, api_key=API_KEY, max_retries=0)
    user = [{"role": "user", "content": EXAMPLES[0].prompt}]
    merge = {"merge": RECIPE.to_dict()}
    r = c.chat.completions.create(model="base", messages=user, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=2, extra_body=merge)
    message, content = r.choices[0].message, r.choices[0].logprobs.content
    assert message.refusal is None and content  # tokens decoding alike (partial UTF-8) share one top entry
    assert all(1 <= len(i.top_logprobs) <= 2 for i in content)
    assert "".join(i.token for i in content).endswith(message.content)
    assert all(bytes(i.bytes).decode() == i.token and i.logprob <= 0 for i in content)
    scored = c.chat.completions.create(
        model="base", messages=user + [{"role": "assistant", "content": " cold"}], max_tokens=0, temperature=0,
        logprobs=True, top_logprobs=1, extra_body={**merge, "echo": True, "continue_final_message": True,
                                                   "add_generation_prompt": False})
    items = scored.choices[0].logprobs.content
    assert [i.token for i in items] == [" cold"] and math.isfinite(items[0].logprob)
    with pytest.raises(openai.UnprocessableEntityError, match="continue_final_message"):
        c.chat.completions.create(model="base", messages=user, max_tokens=0, extra_body={"continue_final_message": True,
                                                                           "add_generation_prompt": False})


@pytest.mark.parametrize("objective", [CE_GREEDY, EXACT], ids=["scored", "generated"])
def test_chat_tokens_without_usage_are_counted_as_usage_counts_them(chat_url: str, objective: Objective) -> None:
    """A provider that omits usage (stripped by the fault proxy): the chat template's tokens and the
    generated answer's are counted by its /tokenize, equal to the usage it would have sent."""
    tokens = []
    for strip in ((), ("usage",)):
        with FaultProxy(chat_url, strip=strip) as proxy:
            api = ApiBackend(proxy.base_url, api_key=API_KEY, objective=objective, chat=True,
                             max_new_tokens=generation_length(EXAMPLES))
            try:
                score = api.evaluate(RECIPE, EXAMPLES)
            finally:
                api.close()
        assert score.ok, score.error
        tokens.append(score.cost.tokens)
    assert proxy.routes["POST /tokenize"] > 0
    assert tokens[1] == tokens[0] > 0
