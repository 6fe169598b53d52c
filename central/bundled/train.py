"""Brief, deterministic training of the bundled models on the bundled corpus.

The data mixes raw passages and ChatML conversations ("continue this" → the rest of the passage), so
both `/v1/completions` and `/v1/chat/completions` answer with recognisable text.

A conversation's user turn is the start of a passage followed by `<|im_end|>`. Trained on, it would
teach "It was the best of times," → end of turn just as often as → the passage's next words, and which
of the two a plain completion picks would be a near tie that flips with the machine's floating-point
details. So, as in chat fine-tuning, the user turn is context only: its tokens are not targets.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from .corpus import PASSAGES
from .tokenizer import BOS, IM_END, IM_START


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    batch: int = 16
    seq_len: int = 96
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0


Segment = tuple[str, bool]  # (text, whether its tokens are training targets)


def chat_sample(passage: str, split_words: int) -> list[Segment]:
    words = passage.split(" ")
    head, tail = " ".join(words[:split_words]), " ".join(words[split_words:])
    return [
        (f"{BOS}{IM_START}user\n{head}{IM_END}\n", False),
        (f"{IM_START}assistant\n{tail}{IM_END}\n", True),
    ]


def training_documents() -> list[list[Segment]]:
    docs = [[(BOS + p + "\n", True)] for p in PASSAGES]
    for passage in PASSAGES:
        for split in (2, 3, 4, 6):
            docs.append(chat_sample(passage, split))
    return docs


def token_stream(
    encode: Callable[[str], list[int]], seed: int, epochs: int = 12
) -> tuple[list[int], list[bool]]:
    """The shuffled documents as one token stream, and for each token whether it is a target."""
    rng = random.Random(seed)
    docs = training_documents()
    ids: list[int] = []
    targets: list[bool] = []
    for _ in range(epochs):
        rng.shuffle(docs)
        for doc in docs:
            for text, trained in doc:
                piece = encode(text)
                ids.extend(piece)
                targets.extend([trained] * len(piece))
    return ids, targets


def train(
    model: Any, stream: tuple[list[int], list[bool]], plan: TrainPlan, log: Callable[[str], None]
) -> dict[str, float]:
    """Train `model` in place for exactly `plan.steps` steps; returns loss and timing figures."""
    import torch

    torch.manual_seed(plan.seed)
    data = torch.tensor(stream[0], dtype=torch.long)
    ignored = ~torch.tensor(stream[1], dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(plan.seed)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(plan.steps):
        starts = torch.randint(0, len(data) - plan.seq_len - 1, (plan.batch,), generator=gen)
        x = torch.stack([data[i : i + plan.seq_len] for i in starts.tolist()])  # (B, T)
        labels = x.masked_fill(torch.stack([ignored[i : i + plan.seq_len] for i in starts.tolist()]), -100)
        lr = plan.lr * min(1.0, (step + 1) / plan.warmup) * (0.1 + 0.9 * (1 - step / plan.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{plan.steps} loss {sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return {
        "final_loss": round(sum(losses[-20:]) / 20, 4),
        "train_s": round(time.perf_counter() - started, 1),
    }
