"""The small models that ship with dsnode as a recipe: built locally, deterministically, then cached.

`ensure_bundled(cache_dir)` returns the folders of a tokenizer-equipped dense model (edge) and a
DeepSeek-V3 MoE model (central), building them the first time (both at once: about six minutes on two idle cores).
Both are ordinary Hugging Face folders, loadable by `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Bump when the corpus, tokenizer, architectures or training plan change: it names the cache folder.
RECIPE_VERSION = "bundled-v3"
VOCAB_SIZE = 512
DENSE_STEPS = 2400
MOE_STEPS = 2400


@dataclass(frozen=True)
class BundledModels:
    root: Path

    @property
    def dense(self) -> Path:
        return self.root / "dense"

    @property
    def moe(self) -> Path:
        return self.root / "moe"

    @property
    def dense_onnx_int8(self) -> Path:
        # "-nbits": the MatMulNBits + GroupQueryAttention format (manifest v2); a new folder name, so a
        # cache built by an older dsnode (MatMulInteger, "dense-onnx-int8") is not reused or rewritten
        return self.root / "dense-onnx-int8-nbits"


def ensure_bundled(cache_dir: Path, log: Callable[[str], None] = print) -> BundledModels:
    """Build the bundled models under `cache_dir` unless a complete build is already there."""
    root = cache_dir / RECIPE_VERSION
    models = BundledModels(root)
    if (root / "BUILD.json").exists():
        return models
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{RECIPE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same recipe
        if not (root / "BUILD.json").exists():
            _build(root, log)
    return models


def _build(root: Path, log: Callable[[str], None]) -> None:
    """The tokenizer here, then both models at once, each in its own single-threaded process (two
    cores: half the time; one thread each: on a busy host two threads per model spin ~15x slower)."""
    import multiprocessing

    from .tokenizer import train_tokenizer
    from .train import tokenizer_text

    staging = Path(tempfile.mkdtemp(prefix=f".{RECIPE_VERSION}-", dir=root.parent))
    try:
        tok = train_tokenizer(tokenizer_text(), VOCAB_SIZE)
        (staging / "tokenizer.json").write_text(tok.to_str())
        jobs = [("dense", DENSE_STEPS), ("moe", MOE_STEPS)]
        for name, steps in jobs:
            log(f"building bundled {name} model ({steps} training steps)")
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.starmap(_build_model, [(name, steps, staging) for name, steps in jobs])
        report: dict[str, object] = {"recipe": RECIPE_VERSION}
        for name, figures in results:
            report["corpus_tokens"] = figures.pop("corpus_tokens")
            report[name] = figures
        (staging / "tokenizer.json").unlink()
        (staging / "BUILD.json").write_text(json.dumps(report, indent=1) + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
        log(f"bundled models ready in {root}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_model(name: str, steps: int, staging: Path) -> tuple[str, dict[str, object]]:
    """Train and save one bundled model (in a worker process); returns its name and figures."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from .architectures import dense_config, moe_config
    from .tokenizer import BOS, IM_END, PAD, save_tokenizer
    from .train import TrainPlan, token_stream, train

    torch.set_num_threads(1)
    tok = Tokenizer.from_str((staging / "tokenizer.json").read_text())
    special = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(IM_END),
               "pad_token_id": tok.token_to_id(PAD)}
    stream = token_stream(lambda s: tok.encode(s).ids, seed=0)
    torch.manual_seed(0)
    config = (dense_config if name == "dense" else moe_config)(tok.get_vocab_size(), special)
    model = AutoModelForCausalLM.from_config(config)
    figures = train(model, stream, TrainPlan(steps=steps), lambda m: print(f"{name}: {m}", flush=True))
    out = staging / name
    model.save_pretrained(str(out))
    save_tokenizer(tok, out, config.max_position_embeddings)
    _write_generation_config(out, special)
    return name, {**figures, "architecture": type(model).__name__, "corpus_tokens": len(stream[0]),
                  "parameters": sum(p.numel() for p in model.parameters())}


def _write_generation_config(out: Path, special: dict[str, int]) -> None:
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.update({k: v for k, v in special.items()})
    config["do_sample"] = False
    path.write_text(json.dumps(config, indent=1) + "\n")

