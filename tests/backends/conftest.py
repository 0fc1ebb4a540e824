"""A tiny real repository with LoRA experts and two small tasks, built once per session."""

from __future__ import annotations

import pytest

from evomerge.tasks import Example
from tests.helpers import tiny


@pytest.fixture(scope="session")
def local_repo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_repo")
    base = tiny.build_base(root / "base")
    experts = {}
    for i in range(2):
        tiny.build_lora_expert(base, root / "experts" / f"lora{i}", seed=40 + i)
        experts[f"lora{i}"] = {"path": f"experts/lora{i}", "kind": "lora", "task": None, "distractor": False}
    return tiny.write_zoo(root, experts)


@pytest.fixture(scope="session")
def examples():
    add = [Example(f"{a}+{b}=", str(a + b), "add", f"add:{a}{b}") for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    word = [Example(f"say {w}:", w, "word", f"word:{w}") for w in ("cat", "dog", "sun")]
    return tuple(add + word)
