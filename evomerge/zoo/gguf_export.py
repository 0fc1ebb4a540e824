"""`evomerge zoo export-gguf`: a repository's base and LoRA experts as GGUF files llama.cpp loads.

Why: llama.cpp's server is the LMaaS people run; it serves LoRA adapters on one base with a scale
per request (`evomerge.backends.llamacpp`), so a zoo in its format lets a search go through code
no one here wrote. Layout written::

    OUT/base.gguf               the base (llama architecture, float32, its BPE tokenizer)
    OUT/experts/NAME.gguf       one LoRA adapter per expert; the file's stem is the expert's name

The base follows llama.cpp's own converter: tensors renamed to GGUF's names, the query and key
projections' rows permuted back to llama.cpp's rotary layout (Hugging Face's differs). An adapter is
llama.cpp's LoRA layout: per module ``blk.N.<tensor>.weight.lora_a`` (r × in) and ``.lora_b``
(out × r, rows permuted like the base for q and k), ``adapter.lora.alpha`` in the metadata; llama.cpp
scales each module by alpha / r, as PEFT does (a module whose PEFT scaling differs, rank or alpha
patterns or rsLoRA, has the ratio folded into its B). Float32 throughout, so an adapter at scale 1
answers as the PEFT model does up to float rounding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evomerge._imports import require
from evomerge.errors import RepositoryError
from evomerge.repository import Repository, TensorReader

BASE_FILE = "base.gguf"
EXPERTS_DIR = "experts"
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face Llama tensor (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = ".".join(parts[3:-1])
        if module in _BLOCK:
            return f"blk.{parts[2]}.{_BLOCK[module]}.weight"
    raise RepositoryError(f"tensor {hf_name} has no GGUF name in llama.cpp's llama layout; export-gguf "
                          "converts Llama-architecture models only")


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) back to llama.cpp's (interleaved pairs), per head."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _heads_of(gguf: str, config: dict[str, Any]) -> int | None:
    """How many heads the rows of `gguf` are grouped in for `_permute`, or None: no permutation."""
    if gguf.endswith("attn_q.weight"):
        return int(config["num_attention_heads"])
    if gguf.endswith("attn_k.weight"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _config(repo: Repository) -> dict[str, Any]:
    config = json.loads((repo.base / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise RepositoryError(f"the base is a {config.get('model_type')!r} model; export-gguf converts Llama "
                              "models only (llama.cpp's llama architecture)")
    return config


def _pre_tokenizer(spec: dict[str, Any] | None, merges: int) -> str:
    """llama.cpp's name for the pre-tokenizer of tokenizer.json (the split before BPE), refusing
    one it does not know rather than tokenizing otherwise than the model was trained."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("ByteLevel", None, True)] or (kinds == [("ByteLevel", None, False)] and merges == 0):
        return "gpt-2"  # without merges every byte is its own token, however the text is split
    raise RepositoryError(f"the base's pre-tokenizer {kinds} has no llama.cpp equivalent export-gguf knows "
                          "(byte-level BPE with the GPT-2 or SmolLM split)")


def _add_tokenizer(writer: Any, base: Path) -> None:
    """The base's byte-level BPE tokenizer (tokenizer.json) as llama.cpp's ``gpt2`` vocabulary."""
    gguf = require("gguf", "export-gguf")
    transformers = require("transformers", "export-gguf")
    spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise RepositoryError(f"the base's tokenizer is {model.get('type')!r}; export-gguf converts BPE tokenizers")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [""] * (max(vocab.values()) + 1)
    for text, index in vocab.items():
        tokens[index] = text
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    kinds = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp refuses a BPE vocabulary without merges; bytes FF FF never occur in UTF-8 text, and
    # a merged symbol missing from the vocabulary falls back to its bytes anyway.
    written = merges or ["\u00ff \u00ff"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer"), len(merges)))
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(written)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    for role in ("bos", "eos", "pad", "unk"):
        index = getattr(tokenizer, f"{role}_token_id")
        if index is not None:
            setter = {"pad": "add_pad_token_id", "unk": "add_unk_token_id"}.get(role, f"add_{role}_token_id")
            getattr(writer, setter)(index)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _writer(path: Path, config: dict[str, Any]) -> Any:
    gguf = require("gguf", "export-gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(int(config["num_hidden_layers"]))
    return writer


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_base(repo: Repository, path: Path) -> Path:
    """The base model as one float32 GGUF file llama.cpp serves."""
    config = _config(repo)
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = config.get("rope_parameters") or {}
    writer = _writer(path, config)
    writer.add_type("model")
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(require("gguf", "export-gguf").LlamaFileType.ALL_F32)
    _add_tokenizer(writer, repo.base)
    with TensorReader() as reader:
        for key in sorted(repo.base_files):
            if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue  # llama.cpp reuses token_embd when there is no output.weight
            name = gguf_name(key)
            data = reader.get(repo.base_files, key).float().numpy()
            heads_of = _heads_of(name, config)
            writer.add_tensor(name, _permute(data, heads_of) if heads_of else data.copy())
        _finish(writer)
    return path


def _lora_tensors(repo: Repository, expert: str, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of an adapter's factors in llama.cpp's layout, its PEFT scaling made
    alpha / r by folding any other ratio into B (see the module docstring)."""
    spec = repo.expert(expert)
    if spec.kind != "lora":
        raise RepositoryError(f"expert {expert!r} is a full checkpoint; llama.cpp serves LoRA adapters only, so "
                              "export-gguf converts LoRA experts")
    alpha = _alpha(repo, expert)
    with TensorReader() as reader:
        for target, module in sorted(spec.modules.items()):
            name = gguf_name(target)
            a = reader.get(spec.files, module.a_key).float().numpy().copy()
            b = reader.get(spec.files, module.b_key).float().numpy() * (module.scaling * module.rank / alpha)
            heads_of = _heads_of(name, config)
            yield f"{name}.lora_a", a
            yield f"{name}.lora_b", (_permute(b, heads_of) if heads_of else b).astype(np.float32)


def _alpha(repo: Repository, expert: str) -> float:
    """The alpha written to the adapter's metadata: PEFT's lora_alpha (scaling × rank of its first module)."""
    first = min(repo.expert(expert).modules.values(), key=lambda m: m.target)
    return first.scaling * first.rank


def export_lora(repo: Repository, expert: str, path: Path) -> Path:
    """One PEFT LoRA expert as a llama.cpp LoRA adapter (GGUF)."""
    config = _config(repo)
    writer = _writer(path, config)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", _alpha(repo, expert))
    for name, data in _lora_tensors(repo, expert, config):
        writer.add_tensor(name, data)
    _finish(writer)
    return path


def export_gguf(repository: str | Path, out: str | Path) -> tuple[Path, dict[str, Path]]:
    """Write `repository`'s base and every LoRA expert into `out` (layout above); returns the
    base's path and {expert: path}. Full-checkpoint experts are refused (llama.cpp cannot scale
    them per request)."""
    repo = Repository.open(repository)
    out = Path(out)
    base = export_base(repo, out / BASE_FILE)
    return base, {name: export_lora(repo, name, out / EXPERTS_DIR / f"{name}.gguf") for name in sorted(repo.experts)}
