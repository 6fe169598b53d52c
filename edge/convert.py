"""`dsnode convert`: a Hugging Face causal-LM folder → a self-describing ONNX model folder for the edge.

Stages: load (check the source, checksum it, load it in float32), export (ONNX with KV cache), quantize
(int8 MatMul weights, or skipped), validate (against the source, through the engine's runner), write
(tokenizer files, report, manifest). Everything is written into a hidden sibling of DST and renamed
to DST at the very end, so a failure or Ctrl-C never leaves a half-written DST; free space is checked
against an estimate before anything is written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnode import __version__
from dsnode.hfconfig import ModelFolderError, read_hf_config
from dsnode.inference.tokenizer import TextTokenizer, TokenizerError

from .architectures import UnsupportedModel, check_supported
from .manifest import (
    MANIFEST_NAME,
    ONNX_FILE,
    VALIDATION_NAME,
    Manifest,
    file_entries,
    folder_checksum,
)
from .progress import Progress

QUANTIZATIONS = ("int8", "none")
STAGES = ("load", "export", "quantize", "validate", "write")
# Top-1 agreement the validation must reach. float32 differs from torch only in summation order, so
# only near-ties may flip; int8 rounds every weight, so a few close calls flip on a real model.
MIN_AGREEMENT = {"none": 0.95, "int8": 0.80}
# Files an edge needs besides the graph: the tokenizer, its chat template, end-of-sequence ids, config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ConvertError(Exception):
    """Bad input or a failed conversion; the message is for the operator, DST was not written."""


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    manifest: Manifest
    report: Any  # validate.ValidationReport
    seconds: float


def convert_model(
    src: Path,
    dst: Path,
    quant: str = "int8",
    min_agreement: float | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert `src` into a new folder `dst`; raises ConvertError (and leaves no `dst`) on failure."""
    started = time.monotonic()
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    if quant not in QUANTIZATIONS:
        raise ConvertError(f"--quant {quant!r}: choose one of {', '.join(QUANTIZATIONS)}")
    hf_config = check_source(src)
    if dst.exists():
        raise ConvertError(f"{dst}: already exists; remove it or choose another destination")
    remove_abandoned_staging(dst)
    parent = _existing_ancestor(dst.parent)
    check_free_space(parent, estimate_bytes(src, hf_config, quant))
    progress = progress or Progress(STAGES)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(dst)}{os.getpid()}-", dir=dst.parent))
    try:
        manifest, report = _convert(src, staging, hf_config, quant, min_agreement, progress)
        staging.chmod(0o755)  # mkdtemp made it private; the daemon may run as another user
        try:
            os.rename(staging, dst)
        except OSError as exc:
            raise ConvertError(f"{dst}: cannot move the result into place ({exc.strerror})") from None
    except Exception as exc:
        full = _disk_full(staging)  # measured before the staging folder frees its space
        shutil.rmtree(staging, ignore_errors=True)
        if full and not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            # some writers (onnxruntime's quantizer) don't report ENOSPC; say what really happened
            raise ConvertError(f"{dst.parent}: the disk filled up while converting ({type(exc).__name__}: "
                               f"{exc}); nothing was left behind") from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConvertResult(dst, manifest, report, time.monotonic() - started)


DISK_FULL_BELOW_BYTES = 4 * 2**20
OLD_STAGING_AGE_S = 3600  # a staging folder without a process id in its name: abandoned after this


def _staging_prefix(dst: Path) -> str:
    return f".{dst.name}.partial-"


def remove_abandoned_staging(dst: Path) -> list[Path]:
    """Staging folders of earlier conversions to `dst` that no process owns any more (the converter
    was killed with SIGKILL, or the machine lost power): removed, and returned. A folder is named
    after its process; one whose process is alive is another conversion at work and is left alone."""
    prefix = _staging_prefix(dst)
    if not dst.parent.is_dir():
        return []
    removed = []
    for path in dst.parent.iterdir():
        if path.name.startswith(prefix) and path.is_dir() and _abandoned(path, path.name[len(prefix):]):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _abandoned(path: Path, suffix: str) -> bool:
    pid, dash, _ = suffix.partition("-")
    if not (dash and pid.isdigit()):  # named before process ids were: judge by age
        return time.time() - path.stat().st_mtime > OLD_STAGING_AGE_S
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive, another user's (or not a pid at all: leave it)
    return False


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BELOW_BYTES
    except OSError:
        return False


def _convert(
    src: Path, out: Path, hf_config: dict[str, Any], quant: str, min_agreement: float | None, progress: Progress
) -> tuple[Manifest, Any]:
    # torch and transformers are imported here, not at module level: `dsnode --help` stays fast
    from .export import OPSET, cache_layout, export_onnx

    with progress.stage("load") as stage:
        source_sha256 = folder_checksum(src)
        model = _load(src, hf_config)
        layout = cache_layout(model)
        stage.note = f"{hf_config['architectures'][0]}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    work = out / "export"
    work.mkdir()
    with progress.stage("export") as stage:
        export_onnx(model, work / ONNX_FILE, layout)
        stage.note = f"opset {OPSET}, {_mb(_bytes(work))}"
    _quantize(work / ONNX_FILE, out / ONNX_FILE, quant, progress)
    shutil.rmtree(work)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    tokenizer = _tokenizer(out)
    threshold = MIN_AGREEMENT[quant] if min_agreement is None else min_agreement
    report = _validate(model, out, tokenizer, quant, threshold, progress)
    with progress.stage("write"):
        manifest = Manifest(
            architecture=hf_config["architectures"][0],
            model_type=str(hf_config["model_type"]),
            quantization=quant,
            opset=OPSET,
            onnx_file=ONNX_FILE,
            context_limit=int(hf_config.get("max_position_embeddings") or 2048),
            kv=layout,
            source={"path": str(src), "sha256": source_sha256},
            tokenizer_sha256=tokenizer.digest,
            files=file_entries(out, [p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_NAME]),
            created_by=f"dsnode {__version__}",
            validation=report.summary(),
        )
        (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest, report


def _quantize(exported: Path, target: Path, quant: str, progress: Progress) -> None:
    from .quantize import place_float, quantize_int8

    if quant == "none":
        place_float(exported, target)
        progress.skip("quantize", "--quant none")
        return
    with progress.stage("quantize") as stage:
        quantize_int8(exported, target)
        stage.note = f"{_mb(_bytes(exported.parent))} -> {_mb(_bytes(target.parent, exclude=exported.parent))}"


def _validate(model: Any, out: Path, tokenizer: TextTokenizer, quant: str, threshold: float,
              progress: Progress) -> Any:
    """The report, printed and saved; ConvertError when the agreement is below `threshold`."""
    from .onnx_runner import OnnxRunner, open_session
    from .validate import prompt_set, validate

    with progress.stage("validate", total=len(prompt_set(tokenizer))) as stage:
        runner = OnnxRunner(open_session(out / ONNX_FILE, device="cpu"))
        report = validate(model, runner, tokenizer, quant, threshold, on_prompt=stage.advance)
        runner.close()
        stage.note = f"agreement {report.agreement:.1%}"
    progress.result(report.render())
    (out / VALIDATION_NAME).write_text(report.to_json())
    if not report.passed:
        raise ConvertError(
            f"validation failed: top-1 agreement {report.agreement:.1%} < {threshold:.0%} "
            f"(report above; --min-agreement lowers the bar)"
        )
    return report


def check_source(src: Path) -> dict[str, Any]:
    """The source's config.json, if it is a supported causal LM with a fast tokenizer."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder")
    try:
        hf_config = read_hf_config(src)
        check_supported(hf_config)
    except (ModelFolderError, UnsupportedModel) as exc:
        raise ConvertError(str(exc)) from None
    if not (src / "tokenizer.json").is_file():
        raise ConvertError(f"{src}: no tokenizer.json (the edge needs a Hugging Face fast tokenizer)")
    if not _weight_files(src):
        raise ConvertError(f"{src}: no weights (*.safetensors or pytorch_model*.bin)")
    return hf_config


def _load(src: Path, hf_config: dict[str, Any]) -> Any:
    from .export import load_source

    try:
        return load_source(src, hf_config)
    except UnsupportedModel as exc:
        raise ConvertError(str(exc)) from None
    except Exception as exc:  # safetensors, torch and transformers each raise their own types
        raise ConvertError(f"{src}: transformers cannot load it: {type(exc).__name__}: {exc}") from None


def _tokenizer(folder: Path) -> TextTokenizer:
    try:
        return TextTokenizer.from_folder(folder)
    except (TokenizerError, ValueError, json.JSONDecodeError) as exc:
        raise ConvertError(f"the tokenizer cannot be read without transformers: {exc}") from None


def _weight_files(src: Path) -> list[Path]:
    return sorted([*src.glob("*.safetensors"), *src.glob("pytorch_model*.bin")])


def parameter_count(src: Path) -> int:
    """Parameters in the source's weights: exact from safetensors headers, else bytes / 2 (16-bit)."""
    total = 0
    for path in _weight_files(src):
        if path.suffix != ".safetensors":
            total += path.stat().st_size // 2
            continue
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
        except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from None
    return total


def estimate_bytes(src: Path, hf_config: dict[str, Any], quant: str) -> int:
    """Peak disk use while converting: the float32 graph (plus a transposed copy of tied embeddings),
    and the int8 graph beside it until the float32 one is deleted."""
    float32 = parameter_count(src) * 4
    if hf_config.get("tie_word_embeddings"):
        float32 += int(hf_config.get("vocab_size", 0)) * int(hf_config.get("hidden_size", 0)) * 4
    int8 = float32 // 2 if quant == "int8" else 0
    return int((float32 + int8) * 1.1) + 64 * 2**20


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConvertError(f"{folder}: not enough free space: about {_mb(needed)} needed, {_mb(free)} free")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _bytes(folder: Path, exclude: Path | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and (exclude is None or exclude not in p.parents))


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
