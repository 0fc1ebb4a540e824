"""`evomerge zoo export-gguf` round trip: the GGUF files loaded by llama.cpp's real server answer as
the PEFT model does (same greedy answers on the task's examples)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from evomerge.tasks import load_jsonl
from tests.helpers.llamacpp_server import LlamaServer, require_xllamacpp, tiny_gguf  # noqa: F401 (fixture)

EXAMPLES = 12


def _server_answers(server: LlamaServer, prompts: list[str], scales: dict[str, float], length: int) -> list[str]:
    from evomerge.serve.protocol import generation_prompt

    ids = {Path(a["path"]).stem: a["id"] for a in httpx.get(server.root + "/lora-adapters").json()}
    lora = [{"id": ids[name], "scale": s} for name, s in scales.items()]
    answers = []
    for prompt in prompts:
        body = {"prompt": generation_prompt(prompt), "max_tokens": length, "temperature": 0.0, "cache_prompt": False,
                "lora": lora}
        text = httpx.post(server.url + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
        answers.append(text.split("\n", 1)[0].strip())
    return answers


def _round_trip(zoo: Path, gguf: Path, log: Path, experts: tuple[str, ...], length: int) -> None:
    import peft
    import torch
    import transformers

    from evomerge.inference import generate_answers

    base = transformers.AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo / "base")
    with LlamaServer(gguf, log) as server:
        for expert in experts:
            examples = load_jsonl(zoo / "tasks" / expert / "test.jsonl", task=expert)[:EXAMPLES]
            prompts = [e.prompt for e in examples]
            plain = generate_answers(base, tokenizer, examples, max_new_tokens=length)
            model = peft.PeftModel.from_pretrained(base, zoo / "experts" / expert).eval()
            expected = generate_answers(model, tokenizer, examples, max_new_tokens=length)
            base = model.unload()
            assert plain != expected, f"{expert}: the adapter changes nothing, so the test could not fail"
            assert _server_answers(server, prompts, {expert: 1.0}, length) == expected, expert
            assert _server_answers(server, prompts, {expert: 0.0}, length) == plain, expert


def test_tiny_zoo_gguf_answers_as_peft(tiny_zoo: Path, tiny_gguf: Path, tmp_path: Path) -> None:  # noqa: F811
    assert sorted(p.stem for p in (tiny_gguf / "experts").glob("*.gguf")) == sorted(
        p.name for p in (tiny_zoo / "experts").iterdir())
    _round_trip(tiny_zoo, tiny_gguf, tmp_path / "server.log", ("upper", "first_letter"), length=12)


@pytest.mark.slow
def test_smol_zoo_gguf_answers_as_peft(tmp_path: Path) -> None:
    """SmolLM2's BPE tokenizer (the smollm pre-tokenizer), grouped-query attention, 30 layers."""
    require_xllamacpp()
    from evomerge.zoo import build
    from evomerge.zoo.gguf_export import export_gguf

    zoo = Path(os.environ.get("EVOMERGE_SMOL_ZOO") or build("smol-mini", tmp_path / "smol", seed=0, progress=False))
    export_gguf(zoo, tmp_path / "gguf")
    _round_trip(zoo, tmp_path / "gguf", tmp_path / "server.log", ("upper", "first_letter"), length=8)


def test_export_gguf_refuses_a_folder_without_a_repository(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from evomerge.cli import main

    assert main(["zoo", "export-gguf", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zoo.json" in err[0]
