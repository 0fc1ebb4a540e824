"""One tiny real repository per session: a 2-layer Llama, full experts and PEFT LoRA adapters."""

from __future__ import annotations

import pytest

from tests.helpers import tiny


@pytest.fixture(scope="session")
def tiny_repo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    base = tiny.build_base(root / "base")
    experts = {}
    for i in range(3):
        tiny.build_full_expert(base, root / "experts" / f"full{i}", seed=10 + i, quantum=0.01 if i < 2 else None)
        experts[f"full{i}"] = {"path": f"experts/full{i}", "kind": "full", "task": None, "distractor": False}
    lora = {"lora0": {}, "lora1": {"alpha": 16}, "lora2": {}, "lora_r2": {"r": 2, "targets": ("q_proj", "down_proj")}}
    for i, (name, kw) in enumerate(lora.items()):
        tiny.build_lora_expert(base, root / "experts" / name, seed=20 + i, **kw)
        experts[name] = {"path": f"experts/{name}", "kind": "lora", "task": None, "distractor": False}
    return tiny.write_zoo(root, experts)


@pytest.fixture(scope="session")
def tiny_repo(tiny_repo_dir):
    from evomerge.repository import Repository

    return Repository.open(tiny_repo_dir)


@pytest.fixture(scope="session")
def engine(tiny_repo):
    from evomerge.merging import MergeEngine

    eng = MergeEngine(tiny_repo, device="cpu", dtype="float32")
    yield eng
    eng.close()
