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
from .formats import (
    Conversation,
    json_conversations,
    json_documents,
    reasoning_conversations,
    tool_conversations,
)
from .tokenizer import BOS, CHAT_TEMPLATE, IM_END, IM_START


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


def conversation_sample(conversation: Conversation) -> list[Segment]:
    """A conversation rendered by the bundled chat template; only its last (assistant) turn is trained.
    A reasoning answer is trained as written: the template drops `<think>…</think>` from history."""
    from dsnode.inference.tokenizer import render_template

    messages, tools = conversation
    prompt = render_template(CHAT_TEMPLATE, messages[:-1], add_generation_prompt=True, tools=tools)
    last = messages[-1]["content"]
    if "<think>" in last:
        return [(BOS + prompt, False), (last + IM_END + "\n", True)]
    full = render_template(CHAT_TEMPLATE, messages, add_generation_prompt=False, tools=tools)
    assert full.startswith(prompt), "the template renders a conversation's history as its prompt"
    return [(BOS + prompt, False), (full[len(prompt):], True)]


def format_documents() -> list[list[Segment]]:
    """Reasoning, tool calls and JSON answers (`formats`), and bare JSON documents."""
    # tool calls are the hardest to learn (a long system turn, then a short answer that copies a city):
    # seen four times as often
    conversations = reasoning_conversations(PASSAGES) + tool_conversations() * 4 + json_conversations() * 2
    docs = [conversation_sample(c) for c in conversations]
    return docs + [[(BOS + doc + "\n", True)] for doc in json_documents()]


def training_documents() -> list[list[Segment]]:
    docs = [[(BOS + p + "\n", True)] for p in PASSAGES]
    for passage in PASSAGES:
        for split in (2, 3, 4, 6):
            docs.append(chat_sample(passage, split))
    return docs + format_documents()


def tokenizer_text() -> str:
    """What the BPE merges are learnt from: the passages (weighted: most of what the models say) and
    the format examples."""
    formats = "".join(text for doc in format_documents() for text, _ in doc)
    return "\n".join(PASSAGES * 6) + "\n" + formats


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
    # Windows end on a target token: a window inside an untrained prompt (a long tool list) would teach
    # nothing, so every window trains, and each kind of text in proportion to its trained tokens.
    ends = torch.nonzero(~ignored[plan.seq_len:]).flatten() + plan.seq_len + 1  # exclusive window ends
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(plan.steps):
        starts = ends[torch.randint(0, len(ends), (plan.batch,), generator=gen)] - plan.seq_len
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
