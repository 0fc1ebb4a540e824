"""Training loops of the zoo: pretraining the tiny base and fine-tuning LoRA experts.

Both use `evomerge.inference.training_batch`, so the experts learn the exact prompt/answer format the
scorers measure.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from evomerge._imports import require
from evomerge.inference import training_batch
from evomerge.tasks import Example

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_steps(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], steps: int, lr: float,
                batch_size: int, seed: int, optimizer: Any = None, on_step: Callable[[], None] | None = None) -> Any:
    """Run `steps` AdamW steps over seeded shuffled batches of (prompt, answer) pairs; return the optimizer."""
    torch = require("torch", "building the zoo")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(pairs)))
            rng.shuffle(extra)
            order.extend(extra)
        batch = [pairs[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = model(**{k: v.to(device) for k, v in training_batch(tokenizer, batch).items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if on_step is not None:
            on_step()
    model.eval()
    return optimizer


def lora_model(base: Any, rank: int, seed: int) -> Any:
    """Wrap `base` in a fresh LoRA adapter (all linear modules of a Llama block), seeded."""
    torch = require("torch", "building the zoo")
    peft = require("peft", "building the zoo")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def as_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    return [(e.prompt, e.answer) for e in examples]
