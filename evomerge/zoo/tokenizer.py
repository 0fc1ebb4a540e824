"""A byte-level tokenizer for the tiny zoo, so any text encodes and no vocabulary file is needed.

Every byte is one token (256 ids) plus ``<pad>``, ``<s>`` (BOS, added in front of text encoded
with special tokens) and ``</s>`` (EOS). Saved with ``save_pretrained`` it loads with
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

from evomerge._imports import require

SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` over bytes with pad, BOS and EOS set."""
    tk = require("tokenizers", "the tiny zoo")
    transformers = require("transformers", "the tiny zoo")
    alphabet = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    core = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = tk.decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS))
    core.post_processor = tk.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right")
