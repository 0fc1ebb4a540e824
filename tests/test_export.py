"""The result of a search as something to deploy: `search --output` and `evomerge export` write an
adapter or checkpoint that peft / transformers load and that answer as the scored merge did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import evomerge  # noqa: E402
from evomerge.api import run  # noqa: E402
from evomerge.cli import main  # noqa: E402
from evomerge.config import SearchConfig  # noqa: E402
from evomerge.search_spaces import build_space  # noqa: E402
from evomerge.tasks import Example, write_jsonl  # noqa: E402
from tests.helpers.bpe import build_tiny_repository  # noqa: E402
from tests.helpers.exported import logits_of, merged_logits  # noqa: E402

SEARCH = [Example(f"Question {i}: sky? Answer:", " blue", id=f"s{i}") for i in range(8)]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A local search over a tiny LoRA repository, its journal and its --output folder."""
    root = tmp_path_factory.mktemp("export")
    write_jsonl(root / "search.jsonl", SEARCH)
    repo = build_tiny_repository(root / "repo")
    config = SearchConfig(backend="local", repository=repo, budget=5, journal=root / "run.sqlite",
                          output=root / "out", task={"files": [root / "search.jsonl"]}, test_metrics=["ce"])
    result, _ = run(config, progress=False)
    return {"root": root, "repo": repo, "journal": root / "run.sqlite", "out": root / "out",
            "recipe": result.best_recipe}


def test_search_output_holds_the_adapter_of_the_best_recipe(searched):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert searched["recipe"].method == "evo_tv"
    assert not (searched["out"] / "model").exists()
    base = AutoModelForCausalLM.from_pretrained(str(searched["repo"] / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(searched["out"] / "adapter"))
    torch.testing.assert_close(logits_of(model, searched["repo"]), merged_logits(searched["repo"], searched["recipe"]),
                               rtol=0, atol=1e-4)


def test_export_writes_adapter_and_checkpoint_from_the_journal(searched, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert main(["export", str(searched["journal"]), "--out", str(tmp_path / "exp"),
                 "--adapter", str(tmp_path / "adapter"), "--model", str(tmp_path / "model")]) == 0
    printed = capsys.readouterr().out
    assert f"adapter: {tmp_path / 'adapter'}" in printed and f"model: {tmp_path / 'model'}" in printed
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "adapter",
                                                                               searched["out"] / "adapter"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    torch.testing.assert_close(logits_of(model, searched["repo"]), merged_logits(searched["repo"], searched["recipe"]),
                               rtol=0, atol=1e-4)
    assert f"{(searched['repo'] / 'base').resolve()}+" in (tmp_path / "exp" / "mergekit.yaml").read_text()


def journal_of(path: Path, method: str, experts: tuple[str, ...], config: dict) -> Path:
    evomerge.search(lambda r: sum(r.weights), build_space(method, list(experts)), budget=2, journal=path,
                    config=config)
    return path


@pytest.mark.parametrize("method, config, flag, words", [
    ("ties", "local", "--adapter", "not low-rank"),
    ("task_arithmetic", "python", "--model", "give --repository"),
])
def test_export_refuses_in_one_line(searched, tmp_path, capsys, method, config, flag, words):
    settings = {"backend": "local", "repository": str(searched["repo"])} if config == "local" else {"backend": "python"}
    journal = journal_of(tmp_path / "j.sqlite", method, ("math", "colour"), settings)
    assert main(["export", str(journal), flag, str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evomerge: error:") and words in err[0], err
    assert not (tmp_path / "w").exists()


def test_no_export_model_writes_the_recipe_only(searched, tmp_path):
    config = SearchConfig(backend="local", repository=searched["repo"], budget=4, output=tmp_path / "out",
                          export_model=False, task={"files": [searched["root"] / "search.jsonl"]}, test_metrics=["ce"])
    run(config, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best_recipe.json", "config.json", "mergekit.yaml"]
