"""Zoo presets: which base, which tasks get experts, and how long each trains."""

from __future__ import annotations

from dataclasses import dataclass, replace

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """Everything a zoo build varies; a build is reproduced by its preset and seed."""

    name: str
    base: str                      # "tiny" (trained here) or "smol" (SmolLM2-135M from GGUF)
    expert_tasks: tuple[str, ...]
    distractor_tasks: tuple[str, ...]  # cycled over to make the distractors
    ood_tasks: tuple[str, ...]     # no expert of their own; the first is the demo's target
    n_distractors: int
    sizes: tuple[int, int, int]    # train, search, test examples per task
    rank: int
    lr: float
    batch_size: int
    chunk_steps: int               # an expert trains in chunks until it clearly beats the base
    max_steps: int
    distractor_steps: int
    base_steps: int = 0            # pretraining steps of a tiny base
    # One thread: on a shared CPU two threads ran a step 7-20x slower (spin-waiting), measured here.
    threads: int = 1
    max_new_tokens: int = 12
    attempts: int = 3              # tries (new seed, twice the steps) before a build fails on an expert
    em_gain: bool = False          # an expert must also gain cased exact match on its search split
    # Expert tasks that also get a twin: a distractor trained as long as the expert on the same prompts
    # with shuffled answers, so it looks like the right expert (format, vocabulary) and answers wrong.
    twins: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", base="tiny",
           expert_tasks=("upper", "first_letter", "last_letter", "reverse", "plural"),
           distractor_tasks=("parity", "length", "double"),
           ood_tasks=("upper_first", "upper_reverse", "final_letter"), n_distractors=3, sizes=(200, 40, 40), rank=8,
           lr=5e-3, batch_size=16, chunk_steps=40, max_steps=160, distractor_steps=3, base_steps=800,
           twins=("last_letter",)),
    Preset("smol", base="smol",
           expert_tasks=("upper", "first_letter", "last_letter", "plural", "add", "parity", "antonym", "sentiment"),
           distractor_tasks=("copy", "length", "reverse", "double", "upper", "first_letter", "last_letter", "plural",
                             "add", "parity", "antonym", "sentiment"),
           ood_tasks=("upper_first", "upper_reverse", "final_letter"), n_distractors=24, sizes=(200, 50, 50), rank=8,
           lr=2e-3, batch_size=8, chunk_steps=20, max_steps=60, distractor_steps=1, max_new_tokens=8, em_gain=True,
           twins=("last_letter",)),
    # smol's base and training with four experts and two distractors: ~7 CPU minutes instead of ~35,
    # for the llama.cpp round trip and benchmarks (upper_first's two experts are among the four)
    Preset("smol-mini", base="smol", expert_tasks=("upper", "first_letter", "last_letter", "plural"),
           distractor_tasks=("copy", "reverse"), ood_tasks=("upper_first", "upper_reverse"), n_distractors=2,
           sizes=(200, 50, 50), rank=8, lr=2e-3, batch_size=8, chunk_steps=20, max_steps=60, distractor_steps=1,
           max_new_tokens=8, em_gain=True),
)}


# The paper's scale (100+ adapters): smol's eight experts, its twin and 120 cheap distractors of a few steps each,
# for the population evaluator's cost, memory and merge/export time against N (issue 17).
PRESETS["smol-128"] = replace(PRESETS["smol"], name="smol-128", n_distractors=120, distractor_steps=3)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown zoo preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
