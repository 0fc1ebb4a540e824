"""Tiny repositories whose tokenizer is a trained byte-level BPE, where `tiny`'s one-token-per-
character tokenizer would hide what tokenization does to scoring and serving.

`build_tiny_repository` is the provider's repository (experts ``math``, ``colour``, ``french``,
a ``<role>:`` chat template for the chat route): the serve, api and fault tests and the
reliability and provider benchmarks. `build_bpe_repository` is the scoring-parity repository:
its merges cross a prompt/answer boundary (``" cold"`` is one token), where scoring ``prompt``
and ``answer`` apart would disagree with scoring them as one string, optionally with an instruct
model's chat template. Both build from configs in a second or two (no hub); expert LoRA B
factors are random, not zero, so each expert changes the model's answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import tiny

PROVIDER_CORPUS = [
    "Question: what is two plus two? Answer: four",
    "Question: what colour is the sky? Answer: blue",
    "Translate to French: cat => chat",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that merged experts.",
] * 4

PROVIDER_EXPERTS = ("math", "colour", "french")
PROVIDER_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>:{% endif %}")
"""A short chat template (the provider's chat route needs one), ending without a space."""

WORDS = ("cold hot warm blue red green grey black white sky sea ice fire sun moon night day snow rain wind "
         "what is the colour of answer question tell me feels like very quite").split()
CORPUS = [f"Question: what is the colour of {a} {b}? Answer: {c}" for a in WORDS for b in WORDS[:6]
          for c in WORDS[:8]][:600] + [f"Tell me the {w}\nAnswer: {w}" for w in WORDS]
"""ASCII only, and the alphabet is the corpus's: every token decodes to text, so two different
greedy answers never decode alike (as lone bytes of a UTF-8 character would, to U+FFFD)."""
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
"""A short Jinja chat template that keeps message content as is (continue_final_message can extend it)."""
EXPERTS = ("lora0", "lora1")


def train_tokenizer(corpus: list[str], vocab_size: int, specials: list[str], pad: str,
                    byte_alphabet: bool = False, chat_template: str | None = None) -> Any:
    """A byte-level BPE trained on `corpus` (specials first, ``<s>`` prepended to every text);
    `byte_alphabet` starts from all 256 bytes rather than the corpus's own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else []
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", specials.index("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad)
    fast.chat_template = chat_template
    return fast


def build_tiny_repository(root: Path, experts: tuple[str, ...] = PROVIDER_EXPERTS) -> Path:
    """Write ROOT/base (model + tokenizer) and ROOT/experts/NAME (PEFT adapters); return ROOT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    fast = train_tokenizer(PROVIDER_CORPUS, 320, ["<s>", "</s>"], "</s>", byte_alphabet=True,
                           chat_template=PROVIDER_CHAT_TEMPLATE)
    torch.manual_seed(0)
    cfg = tiny.config(vocab_size=len(fast), num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    fast.save_pretrained(root / "base")
    for i, name in enumerate(experts):
        torch.manual_seed(100 + i)
        model = get_peft_model(LlamaForCausalLM(cfg).eval(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        model.base_model.model.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.5)
        model.save_pretrained(root / "experts" / name)
    return root


def bpe_tokenizer(chat_template: str | None = None) -> Any:
    """The scoring-parity repository's tokenizer."""
    return train_tokenizer(CORPUS, 420, ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"], "<pad>",
                           chat_template=chat_template)


def build_bpe_repository(root: Path, chat_template: str | None = None, spread: float | None = 0.3) -> Path:
    """ROOT/base (a random Llama; weights drawn with std `spread`, wide so greedy choices are far
    from ties, or the default init for None) and ROOT/experts/NAME (PEFT LoRA adapters); return ROOT."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = bpe_tokenizer(chat_template)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny.config(vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2))
    if spread is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, spread)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    for i, name in enumerate(EXPERTS):
        tiny.build_lora_expert(base, root / "experts" / name, seed=60 + i)
    return root


def train_full_expert(root: Path, name: str, pairs: list[tuple[str, str]], steps: int = 60) -> Path:
    """ROOT/experts/NAME: the base fine-tuned (every weight) on `pairs` in the scored format
    (`evomerge.inference.training_batch`), until it answers them by heart and stops (EOS)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evomerge.inference import training_batch

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(root / "base").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = training_batch(tokenizer, pairs)
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(root / "experts" / name)
    return root
