"""RegMean alignment of LoRA experts (`evomerge.merging.regmean`) on a real tiny Llama and PEFT adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from evomerge import inference  # noqa: E402
from evomerge.errors import RepositoryError  # noqa: E402
from evomerge.merging import MergeEngine, regmean  # noqa: E402
from evomerge.recipe import MergeRecipe  # noqa: E402
from evomerge.repository import Repository  # noqa: E402
from evomerge.tasks import Example  # noqa: E402

EXPERTS = ("lora0", "lora_r2")  # rank 4 on q, v, up; rank 2 on q, down: modules one expert lacks
SERVES = {"a": "lora0", "b": "lora_r2"}


def examples(task: str, texts: list[tuple[str, str]]) -> list[Example]:
    return [Example(p, a, task=task, id=f"{task}{i}") for i, (p, a) in enumerate(texts)]


FIT = examples("a", [("ab", "c")]) + examples("b", [("9 =", "x")])
"""Few tokens (9 in all with EOS, under the width 32 of every input), so past the first layer each
task's inputs are independent of the other's and exact least squares can reproduce both experts."""


def module_inputs(engine, fit: list[Example], source=None) -> dict[tuple[str, str], torch.Tensor]:
    """(target, task) -> the inputs to that module on the task's examples of the base model, or of
    the merge `source` names for the task."""
    seen: dict[tuple[str, str], list[torch.Tensor]] = {}
    current = {}
    targets = sorted({t for e in EXPERTS for t in engine.repository.expert(e).modules})

    def hook(target):
        def pre(module, args):
            seen.setdefault((target, current["task"]), []).append(args[0].reshape(-1, args[0].shape[-1]).float())
        return pre

    handles = [engine.model.get_submodule(t.removesuffix(".weight")).register_forward_pre_hook(hook(t))
               for t in targets]
    try:
        for ex in fit:
            current["task"] = ex.task
            with torch.no_grad(), engine.merged((source or {}).get(ex.task)) as model:
                model(input_ids=inference.training_batch(engine.tokenizer, [(ex.prompt, ex.answer)])["input_ids"])
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def update(repo: Repository, expert: str, target: str, a: torch.Tensor | None = None) -> torch.Tensor:
    """s·B·A of one expert on one module (zero where it has none), A replaced by `a` when given."""
    from safetensors.torch import load_file

    module = repo.expert(expert).modules.get(target)
    out_f, in_f = repo.base_shapes[target]
    if module is None:
        return torch.zeros(out_f, in_f)
    tensors = {}
    for path in set(repo.expert(expert).files.values()):
        tensors.update(load_file(str(path)))
    return module.scaling * tensors[module.b_key].float() @ (tensors[module.a_key].float() if a is None else a)


def assert_least_squares(tiny_repo, factors, inputs) -> None:
    """Per module, the merged update M of `factors` has zero gradient of Σ_t ||X_t·(M − ΔW_t)ᵀ||²
    over the tasks' `inputs` X_t."""
    for target in sorted({t for e in EXPERTS for t in tiny_repo.expert(e).modules}):
        merged = sum(update(tiny_repo, e, target, factors[e].get(_a_key(tiny_repo, e, target))) for e in EXPERTS)
        own = {t: update(tiny_repo, e, target) for t, e in SERVES.items()}
        grams = {t: inputs[(target, t)].T @ inputs[(target, t)] for t in SERVES}
        gradient = sum(grams[t] @ (merged - own[t]).T for t in SERVES)
        scale = float(sum(grams[t] @ own[t].T for t in SERVES).abs().max())
        assert float(gradient.abs().max()) < 1e-4 * scale, target


def test_exact_regmean_solves_the_least_squares_merge(engine, tiny_repo) -> None:
    """λ = 1: per module, the merged update M minimises Σ_t ||X_t·(M − ΔW_t)ᵀ||² over the tasks'
    inputs X_t (zero gradient); where the tasks' inputs are linearly independent (past layer 0,
    whose shared EOS input is one row in both), it reproduces each expert on its own inputs, where
    the plain sum does not."""
    factors = regmean.aligned_factors(engine, EXPERTS, FIT, SERVES, shrink=1.0)
    inputs = module_inputs(engine, FIT)
    assert_least_squares(tiny_repo, factors, inputs)
    independent = 0
    for target in sorted({t for e in EXPERTS for t in tiny_repo.expert(e).modules}):
        merged = sum(update(tiny_repo, e, target, factors[e].get(_a_key(tiny_repo, e, target))) for e in EXPERTS)
        own = {t: update(tiny_repo, e, target) for t, e in SERVES.items()}
        stacked = torch.cat([inputs[(target, t)] for t in SERVES])
        if torch.linalg.matrix_rank(stacked.double()) < stacked.shape[0]:
            continue
        independent += 1
        for task in SERVES:
            x = inputs[(target, task)]
            plain_sum = x @ sum(own.values()).T
            size = float(plain_sum.abs().max())
            torch.testing.assert_close(x @ merged.T, x @ own[task].T, atol=1e-4 * size, rtol=0)
            if "q_proj" in target:  # both experts adapt it
                assert float((plain_sum - x @ own[task].T).abs().max()) > 0.1 * size
    assert independent >= 4  # layer 1's q, v, up, down


def test_a_source_merge_supplies_the_inputs_the_factors_are_fit_on(engine, tiny_repo) -> None:
    """With `source`, the least squares are over the inputs each task's source merge gives its
    layers (here each task's own expert), not the base model's: the two fits differ."""
    source = {t: MergeRecipe("task_arithmetic", (e,), (1.0,)) for t, e in SERVES.items()}
    factors = regmean.aligned_factors(engine, EXPERTS, FIT, SERVES, shrink=1.0, source=source)
    assert_least_squares(tiny_repo, factors, module_inputs(engine, FIT, source))
    on_base = regmean.aligned_factors(engine, EXPERTS, FIT, SERVES, shrink=1.0)
    assert any(not torch.allclose(on_base[e][k], a, rtol=1e-3, atol=1e-6)
               for e in EXPERTS for k, a in factors[e].items())


def test_an_expert_serving_no_task_is_fit_to_the_mean_of_the_tasks(engine, tiny_repo) -> None:
    """λ = 1 with a third expert that serves no task: the merge solves Σ_i G_i·(M − ΔW_i)ᵀ = 0
    with that expert's G the mean of the tasks' Grams."""
    experts = ("lora0", "lora1", "lora_r2")
    factors = regmean.aligned_factors(engine, experts, FIT, SERVES, shrink=1.0)
    inputs = module_inputs(engine, FIT)
    weights = regmean.task_weights(experts, sorted(SERVES), SERVES)
    for target in sorted({t for e in experts for t in tiny_repo.expert(e).modules}):
        grams = [inputs[(target, t)].T @ inputs[(target, t)] for t in sorted(SERVES)]
        g = [sum(float(w) * gram for w, gram in zip(row, grams, strict=True)) for row in weights]
        deltas = [update(tiny_repo, e, target) for e in experts]
        merged = sum(update(tiny_repo, e, target, factors[e].get(_a_key(tiny_repo, e, target))) for e in experts)
        gradient = sum(gi @ (merged - d).T for gi, d in zip(g, deltas, strict=True))
        scale = float(sum(gi @ d.T for gi, d in zip(g, deltas, strict=True)).abs().max())
        assert float(gradient.abs().max()) < 1e-4 * scale, target


def _a_key(repo: Repository, expert: str, target: str) -> str:
    module = repo.expert(expert).modules.get(target)
    return "" if module is None else module.a_key


def test_no_shrink_is_a_per_input_feature_weighted_average(engine, tiny_repo) -> None:
    """λ = 0 keeps only the Grams' diagonals: Ã_i = A_i·diag(G_i)/diag(Σ G), column by column."""
    factors = regmean.aligned_factors(engine, EXPERTS, FIT, SERVES, shrink=0.0)
    inputs = module_inputs(engine, FIT)
    target = next(t for t in tiny_repo.expert("lora0").modules if "q_proj" in t)
    energy = {task: (inputs[(target, task)] ** 2).sum(0) for task in SERVES}
    module = tiny_repo.expert("lora0").modules[target]
    from safetensors.torch import load_file

    a = load_file(str(next(iter(tiny_repo.expert("lora0").files.values()))))[module.a_key].float()
    want = a * (energy["a"] / (energy["a"] + energy["b"]))[None, :]
    torch.testing.assert_close(factors["lora0"][module.a_key], want, rtol=1e-4, atol=1e-7)


def test_an_expert_serving_no_task_gets_the_mean_of_the_tasks_grams() -> None:
    w = regmean.task_weights(["x", "y", "z"], ["a", "b"], {"a": "x", "b": "x"})
    np.testing.assert_array_equal(w, [[1.0, 1.0], [0.5, 0.5], [0.5, 0.5]])


def test_serving_gives_each_task_to_its_trained_expert(tiny_zoo) -> None:
    """On the tiny zoo, whose experts were trained on its tasks, each task goes to its own expert
    (and not to the shuffled-label twin of last_letter)."""
    from evomerge.merging import MergeEngine
    from evomerge.tasks import load_jsonl

    repo = Repository.open(tiny_zoo)
    fit = [ex for t in ("upper", "last_letter", "plural") for ex in load_jsonl(repo.tasks[t]["search"], task=t)[:6]]
    engine = MergeEngine(repo, device="cpu", dtype="float32")
    try:
        serves = regmean.serving(engine, sorted(repo.experts), fit)
    finally:
        engine.close()
    assert serves == {"upper": "upper", "last_letter": "last_letter", "plural": "plural"}


def test_aligned_repository_holds_both_and_is_built_once(engine, tiny_repo, tmp_path, tmp_path_factory) -> None:
    root, serves = regmean.align_repository(tiny_repo, EXPERTS, FIT, tmp_path, dtype="float32")
    assert serves == regmean.serving(engine, EXPERTS, FIT)
    aligned = Repository.open(root)
    assert set(aligned.experts) == {*EXPERTS, *(regmean.aligned_name(e) for e in EXPERTS)}
    assert aligned.expert("lora0").path == tiny_repo.expert("lora0").path.resolve()
    copy = aligned.expert(regmean.aligned_name("lora_r2"))
    assert copy.modules == tiny_repo.expert("lora_r2").modules  # same modules, keys, ranks and scalings
    for module in copy.modules.values():
        from safetensors.torch import load_file

        new = load_file(str(copy.path / "adapter_model.safetensors"))
        old = {}
        for p in set(tiny_repo.expert("lora_r2").files.values()):
            old.update(load_file(str(p)))
        torch.testing.assert_close(new[module.b_key], old[module.b_key], rtol=0, atol=0)
        assert not torch.allclose(new[module.a_key], old[module.a_key])
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["aligned"]["serves"] == serves
    # The second fit's factors: fit again on the inputs the first fit's merge (RegMean itself) gives.
    first = regmean.write_aligned(tiny_repo, EXPERTS, regmean.aligned_factors(engine, EXPERTS, FIT, serves), serves,
                                  tmp_path_factory.mktemp("first") / "first")
    first_engine = MergeEngine(Repository.open(first), device="cpu", dtype="float32")
    try:
        merge = regmean.regmean_recipe([regmean.aligned_name(e) for e in EXPERTS])
        want = regmean.aligned_factors(first_engine, EXPERTS, FIT, serves, source=dict.fromkeys(serves, merge))
    finally:
        first_engine.close()
    for key, a in want["lora_r2"].items():
        torch.testing.assert_close(new[key], a, rtol=1e-5, atol=1e-7)
    stamp = (root / "zoo.json").stat().st_mtime_ns
    again, _ = regmean.align_repository(tiny_repo, EXPERTS, FIT, tmp_path, dtype="float32")
    assert again == root and (root / "zoo.json").stat().st_mtime_ns == stamp
    other, _ = regmean.align_repository(tiny_repo, EXPERTS, FIT[::-1] + examples("b", [("1", "2")]), tmp_path,
                                        dtype="float32")
    assert other != root  # other fit examples, other factors
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, other.name])  # no temporary left


def test_a_second_writer_of_the_same_alignment_keeps_the_first(engine, tiny_repo, tmp_path) -> None:
    factors = regmean.aligned_factors(engine, EXPERTS, FIT, SERVES)
    out = regmean.write_aligned(tiny_repo, EXPERTS, factors, SERVES, tmp_path / "key")
    first = (out / "zoo.json").stat().st_mtime_ns
    assert regmean.write_aligned(tiny_repo, EXPERTS, factors, SERVES, tmp_path / "key") == out
    assert (out / "zoo.json").stat().st_mtime_ns == first and [p.name for p in tmp_path.iterdir()] == ["key"]


def test_refuses_full_checkpoints_and_a_single_task(tiny_repo, tmp_path) -> None:
    with pytest.raises(RepositoryError, match="full checkpoint"):
        regmean.align_repository(tiny_repo, ("lora0", "full0"), FIT, tmp_path)
    with pytest.raises(RepositoryError, match="two tasks"):
        regmean.align_repository(tiny_repo, EXPERTS, [e for e in FIT if e.task == "a"], tmp_path)
    assert not list(tmp_path.iterdir())
