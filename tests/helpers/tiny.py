"""Untrained tiny transformers and experts on disk in milliseconds, for tests of the repository,
the merge math and the backends.

A 2-layer Llama with a character-level tokenizer (one token per character, so no tokenization
question arises) is saved as a real Hugging Face directory; full experts are perturbed copies of
it; LoRA experts are real PEFT adapters with B ≠ 0.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + list(string.ascii_lowercase + string.digits + " .,:?=+-")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=128,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_base(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(**overrides)).eval()
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def build_full_expert(base: Path, path: Path, seed: int, scale: float = 0.02, quantum: float | None = None) -> Path:
    """A full checkpoint: every base tensor plus seeded noise (rounded to `quantum` to force ties)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            if quantum is not None:
                noise = torch.round(noise / quantum) * quantum
            p.add_(noise)
    model.save_pretrained(path)
    return path


def build_lora_expert(base: Path, path: Path, seed: int, r: int = 4, alpha: int = 8,
                      targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj")) -> Path:
    """A real PEFT LoRA adapter with random A and B (B ≠ 0, so the expert changes the model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(path)
    return path


def write_zoo(root: Path, experts: dict[str, dict], tasks: dict[str, dict] | None = None) -> Path:
    (root / "zoo.json").write_text(json.dumps({"preset": "tiny", "base": "base", "experts": experts,
                                               "tasks": tasks or {}}))
    return root
