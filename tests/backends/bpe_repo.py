"""A tiny repository whose tokenizer is a trained byte-level BPE, so merges cross a prompt/answer
boundary (``" cold"`` is one token): where scoring ``prompt`` and ``answer`` apart would disagree
with scoring them as one string. Optionally with a chat template, as an instruct model has.
"""

from __future__ import annotations

from pathlib import Path

from tests import _tiny

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


def bpe_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = chat_template
    return fast


def build_bpe_repository(root: Path, chat_template: str | None = None, spread: float | None = 0.3) -> Path:
    """ROOT/base (a random Llama; weights drawn with std `spread`, wide so greedy choices are far
    from ties, or the default init for None) and ROOT/experts/NAME (PEFT LoRA adapters); return ROOT."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = bpe_tokenizer(chat_template)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny.config(vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2))
    if spread is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, spread)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    for i, name in enumerate(EXPERTS):
        _tiny.build_lora_expert(base, root / "experts" / name, seed=60 + i)
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
