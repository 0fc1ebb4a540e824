"""`evomerge.backends.prepare` wires the task's generation length, batch size and chat flag into the backends."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("peft")

from evomerge.config import SearchConfig  # noqa: E402
from evomerge.errors import ConfigError, TaskError  # noqa: E402
from evomerge.backends import prepare  # noqa: E402
from evomerge.tasks import Example, generation_length, write_jsonl  # noqa: E402
from tests.helpers.bpe import build_tiny_repository  # noqa: E402

SEARCH = [Example(f"Question {i}: sky? Answer:", " blue", id=f"s{i}") for i in range(8)]
TEST = [Example("Question: sky at night? Answer:", " a very dark blue, nearly black", id="t0")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    write_jsonl(root / "search.jsonl", SEARCH)
    write_jsonl(root / "test.jsonl", TEST)
    repo = build_tiny_repository(root / "repo", experts=("math", "colour"))
    plain = shutil.copytree(repo, root / "plain")
    (plain / "base" / "chat_template.jinja").unlink()  # a base model's tokenizer: no chat template
    return {"repo": repo, "plain": plain, "search": root / "search.jsonl", "test": root / "test.jsonl"}


def config(setup: dict[str, Path], backend: str, repo: str = "repo", **fields) -> SearchConfig:
    task = {"files": [setup["search"]], "test_files": [setup["test"]], **fields.pop("task", {})}
    return SearchConfig(backend=backend, repository=setup[repo], task=task, **fields)


def test_the_length_is_the_whole_tasks_and_batch_size_and_chat_reach_the_local_factory(setup) -> None:
    with ExitStack() as stack:
        factory = prepare(config(setup, "local", batch_size=3, task={"chat": True}), stack).evaluator
        assert factory.max_new_tokens == generation_length(TEST) > generation_length(SEARCH)  # test's answer
        assert (factory.batch_size, factory.chat) == (3, True)
        assert prepare(config(setup, "local", task={"max_new_tokens": 7}), stack).evaluator.max_new_tokens == 7


def test_the_api_factory_gets_the_same_length_and_a_limit_past_the_provider_is_one_line(setup) -> None:
    with ExitStack() as stack:
        options = dict(prepare(config(setup, "api", batch_size=5), stack).evaluator.options)
    assert (options["max_new_tokens"], options["batch_size"], options["chat"]) == (generation_length(TEST), 5, False)
    with pytest.raises(ConfigError, match="max_tokens limit of 256") as info, ExitStack() as stack:
        prepare(config(setup, "api", task={"max_new_tokens": 300}), stack)
    assert "\n" not in str(info.value)
    with ExitStack() as stack:  # nothing generates: the length does not matter
        prepare(config(setup, "api", task={"max_new_tokens": 300}, objective={"metric": "ce"}, test_metrics=["ce"]),
                stack)


def test_chat_without_a_template_is_refused_before_the_search(setup) -> None:
    with pytest.raises(TaskError, match="task.chat") as info, ExitStack() as stack:
        prepare(config(setup, "local", repo="plain", task={"chat": True}), stack)
    assert "\n" not in str(info.value)
