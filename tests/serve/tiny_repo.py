"""A real tiny repository for provider tests: a 2-layer Llama, its own BPE tokenizer, PEFT LoRA experts.

Built from configs in a second or two (no hub); expert LoRA B factors are random, not zero, so
each expert changes the model's answers.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Question: what is two plus two? Answer: four",
    "Question: what colour is the sky? Answer: blue",
    "Translate to French: cat => chat",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that merged experts.",
] * 4

EXPERTS = ("math", "colour", "french")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>:{% endif %}")
"""A short chat template (the provider's chat route needs one), ending without a space."""


def build_tiny_repository(root: Path, experts: tuple[str, ...] = EXPERTS) -> Path:
    """Write ROOT/base (model + tokenizer) and ROOT/experts/NAME (PEFT adapters); return ROOT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
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
