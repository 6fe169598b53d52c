"""`dsnode convert`: a Hugging Face causal-LM folder → a self-describing ONNX model folder for the edge.

Two graphs, chosen by architecture (docs/edge.md, "Formats"):
- "gqa" (dense Llama-family models: llama, qwen2, mistral): built by `edge/graph_builder.py` straight from
  the safetensors, one weight at a time, quantized as it goes (MatMulNBits int8/int4, or float), with
  GroupQueryAttention over an in-place KV buffer. Stages: load (check and checksum the source; torch is
  not needed), export (build + quantize, layer by layer), validate (the source model in its own dtype
  computes the reference first and is freed before the ONNX model is opened), write.
- "export" (MoE/MLA models, and `--quant int8-dynamic`): the source traced by torch.onnx in float32
  (`edge/export.py`), then quantized (MatMulNBits weights, or the older MatMulInteger format).
Stages: load, export, quantize, validate (against the source, through the engine's runner), write
(tokenizer files, report, manifest). Everything is written into a hidden sibling of DST and renamed
to DST at the very end, so a failure or Ctrl-C never leaves a half-written DST; free space is checked
against an estimate before anything is written.
"""

from __future__ import annotations

import errno
import gc
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
from .convert_options import MIN_AGREEMENT, QUANTIZATIONS, TARGETS, ConvertError, ConvertOptions
from .kv_calibration import KVScales
from .manifest import (
    GRAPH_EXPORT,
    GRAPH_GQA,
    MANIFEST_NAME,
    ONNX_FILE,
    VALIDATION_NAME,
    KVLayout,
    Manifest,
    file_entries,
    folder_checksum,
)
from .model_shape import ModelShape, NotBuildable, model_shape
from .nbits import BITS
from .progress import Progress

__all__ = ["QUANTIZATIONS", "STAGES", "TARGETS", "ConvertError", "ConvertOptions", "ConvertResult", "convert_model"]

STAGES = ("load", "export", "quantize", "validate", "write")
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
    options: ConvertOptions | None = None,
    validate: bool = True,
) -> ConvertResult:
    """Convert `src` into a new folder `dst`; raises ConvertError (and leaves no `dst`) on failure.
    `options` (target, block size, accuracy level) overrides `quant` when given. `validate=False` is for
    speed checks on random weights only (scripts/gpu_check.py): the manifest then says it was skipped."""
    started = time.monotonic()
    options = options or ConvertOptions(quant=quant)
    options.check()
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    hf_config = check_source(src)
    if dst.exists():
        raise ConvertError(f"{dst}: already exists; remove it or choose another destination")
    remove_abandoned_staging(dst)
    parent = _existing_ancestor(dst.parent)
    shape = buildable_shape(hf_config, options)
    check_free_space(parent, estimate_bytes(src, hf_config, options.quant, gqa=shape is not None))
    progress = progress or Progress(STAGES)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(dst)}{os.getpid()}-", dir=dst.parent))
    try:
        manifest, report = _convert(src, staging, hf_config, shape, options, min_agreement, progress, validate)
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


def buildable_shape(hf_config: dict[str, Any], options: ConvertOptions) -> ModelShape | None:
    """The shape for the GQA builder, or None for the traced-export path (which has no float16 target)."""
    if options.quant == "int8-dynamic":
        if options.target != "cpu":
            raise ConvertError("--quant int8-dynamic runs on the CPU only (MatMulInteger over uint8 activations "
                               "has no CUDA kernel); use --quant int8 or int4 for --target cuda")
        return None
    try:
        return model_shape(hf_config)
    except NotBuildable as exc:
        if options.kv_cache != "float":
            raise ConvertError(f"--kv-cache {options.kv_cache}: this model takes the traced-export path ({exc}), "
                               "which keeps a float cache") from None
        if options.target != "cpu":
            raise ConvertError(f"--target {options.target}: this model takes the traced-export path ({exc}), "
                               "which is built for the CPU only") from None
        return None


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
    src: Path, out: Path, hf_config: dict[str, Any], shape: ModelShape | None, options: ConvertOptions,
    min_agreement: float | None, progress: Progress, validate: bool = True,
) -> tuple[Manifest, Any]:
    model = None
    kv_scales: KVScales | None = None
    refs: list[Any] | None = None  # the validation references, where the source was loaded for calibration
    with progress.stage("load") as stage:
        source_sha256 = folder_checksum(src)
        if shape is None:
            model = _load(src, hf_config)
            layout = _cache_layout(model)
        else:
            _check_weights(src, shape)
            layout = KVLayout(shape.layers, (shape.kv_heads, shape.head_dim), (shape.kv_heads, shape.head_dim))
            if options.kv_cache == "int8":
                kv_scales, refs = _calibrate_kv_cache(src, hf_config, options.calibration_text,
                                                      with_references=validate)
        stage.note = f"{hf_config['architectures'][0]}, {parameter_count(src) / 1e6:.1f}M params" + (
            ", int8 KV cache calibrated" if kv_scales is not None else "") + (
            ", validation references computed" if refs is not None else "")
    if shape is None:
        opset, float_layers = _export_and_quantize(model, out, layout, options, progress)
    else:
        opset, float_layers = _build(src, out, shape, options, progress, kv_scales)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    tokenizer = _tokenizer(out)
    threshold = MIN_AGREEMENT[options.quant] if min_agreement is None else min_agreement
    graph = GRAPH_EXPORT if shape is None else GRAPH_GQA
    context = int(hf_config.get("max_position_embeddings") or 2048)
    report = None
    if validate:
        report = _validate(src, hf_config, model, out, tokenizer, graph, context, options, float_layers, threshold,
                           progress, refs)
    else:
        progress.skip("validate", "not asked for")
    with progress.stage("write"):
        manifest = Manifest(
            architecture=hf_config["architectures"][0],
            model_type=str(hf_config["model_type"]),
            quantization=options.quant,
            opset=opset,
            onnx_file=ONNX_FILE,
            context_limit=context,
            kv=layout,
            source={"path": str(src), "sha256": source_sha256},
            tokenizer_sha256=tokenizer.digest,
            files=file_entries(out, [p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_NAME]),
            created_by=f"dsnode {__version__}",
            validation=report.summary() if report else {"skipped": "converted with validate=False"},
            graph=graph,
            target=options.target,
            weights=options.weights(float_layers),
            kv_cache=options.kv_cache_description(),
        )
        (out / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest, report


def _check_weights(src: Path, shape: ModelShape) -> None:
    from .checkpoint import Checkpoint, CheckpointError
    from .graph_builder import weight_names

    try:
        Checkpoint(src).check(weight_names(shape))
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None


def _cache_layout(model: Any) -> KVLayout:
    from .export import cache_layout

    return cache_layout(model)


def _calibrate_kv_cache(src: Path, hf_config: dict[str, Any], text: Path | None, with_references: bool
                        ) -> tuple[KVScales, list[Any] | None]:
    """Per-channel int8 cache scales from the source model (on `text`'s passages, else the built-in
    ones), and (`with_references`) the validation's references from the same load, so a 7B source is
    read once; then the model is freed, before the graph is built."""
    from .kv_calibration import CALIBRATION_TEXTS, calibrate, calibration_prompts, read_passages
    from .validate import references

    passages = read_passages(text) if text is not None else CALIBRATION_TEXTS
    model = _load(src, hf_config, source_dtype=True)
    try:
        tokenizer = _tokenizer(src)
        prompts = calibration_prompts(tokenizer, int(hf_config["vocab_size"]), passages=passages)
        scales = calibrate(model, prompts)
        return scales, references(model, tokenizer) if with_references else None
    finally:
        del model
        gc.collect()


def _build(src: Path, out: Path, shape: ModelShape, options: ConvertOptions, progress: Progress,
           kv_scales: KVScales | None = None) -> tuple[int, dict[str, str]]:
    """The GQA graph, quantized weight by weight while it is built (no float copy of the model on disk)."""
    from .graph_builder import BuildOptions, build_decoder
    from .weight_pipeline import auto_threads

    build = BuildOptions(options.quant if options.quant != "int8-dynamic" else "none", options.target,
                         options.block_size, options.accuracy_level, options.symmetric, options.kv_cache,
                         options.threads or auto_threads())
    with progress.stage("export", total=shape.layers) as stage:
        report = build_decoder(src, shape, build, out / ONNX_FILE, on_layer=lambda layer: stage.advance(),
                               kv_scales=kv_scales)
        stage.note = (f"GQA graph{', decode attention by MatMul' if build.decode_by_matmul else ''}, "
                      f"{_mb(_bytes(out))}, weights prepared on {build.threads} thread{'s' if build.threads > 1 else ''}")
    if options.quant == "none":
        progress.skip("quantize", "--quant none")
    else:
        progress.skip("quantize", f"done in export, weight by weight: {options.quant} MatMulNBits, "
                                  f"block {options.block_size}, {len(report.quantized)} weights")
    return build.opset, report.float_layers


def _export_and_quantize(model: Any, out: Path, layout: KVLayout, options: ConvertOptions,
                         progress: Progress) -> tuple[int, dict[str, str]]:
    from .export import OPSET, export_onnx

    work = out / "export"
    work.mkdir()
    with progress.stage("export") as stage:
        export_onnx(model, work / ONNX_FILE, layout)
        stage.note = f"opset {OPSET}, {_mb(_bytes(work))}"
    float_layers = _quantize(work / ONNX_FILE, out / ONNX_FILE, options, progress)
    shutil.rmtree(work)
    return OPSET, float_layers


def _quantize(exported: Path, target: Path, options: ConvertOptions, progress: Progress) -> dict[str, str]:
    from .quantize import place_float, quantize_int8, quantize_nbits

    if options.quant == "none":
        place_float(exported, target)
        progress.skip("quantize", "--quant none")
        return {}
    float_layers: dict[str, str] = {}
    with progress.stage("quantize") as stage:
        if options.quant == "int8-dynamic":
            quantize_int8(exported, target)
        else:
            float_layers = quantize_nbits(exported, target, BITS[options.quant], options.block_size,
                                          options.accuracy_level, options.symmetric)
        stage.note = f"{_mb(_bytes(exported.parent))} -> {_mb(_bytes(target.parent, exclude=exported.parent))}"
    return float_layers


def _validate(src: Path, hf_config: dict[str, Any], model: Any, out: Path, tokenizer: TextTokenizer, graph: str,
              context: int, options: ConvertOptions, float_layers: dict[str, str], threshold: float,
              progress: Progress, refs: list[Any] | None = None) -> Any:
    """The report, printed and saved; ConvertError when the agreement is below `threshold`. `refs`: the
    references computed at load, if they were."""
    from .validate import compare, prompt_set, references

    with progress.stage("validate", total=None if refs is not None else len(prompt_set(tokenizer))) as stage:
        if refs is None:
            if model is None:  # the GQA path: the source in its own dtype, only for as long as it is needed
                model = _load(src, hf_config, source_dtype=True)
            refs = references(model, tokenizer, on_prompt=stage.advance)
        del model
        gc.collect()
        runner = _runner(out, graph, context)
        report = compare(refs, runner, options.quant, threshold, float_layers)
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


def _runner(out: Path, graph: str, context: int) -> Any:
    """The engine's own runner for the new folder, on the CPU (the converting host may have no GPU)."""
    from .onnx_runner import OnnxRunner, open_session
    from .slot_runner import SlotRunner

    session = open_session(out / ONNX_FILE, device="cpu")
    return SlotRunner(session, context) if graph == GRAPH_GQA else OnnxRunner(session)


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


def _load(src: Path, hf_config: dict[str, Any], source_dtype: bool = False) -> Any:
    """The source model in float32, or with `source_dtype` in the dtype its weights are stored in
    (bf16 for a 7B checkpoint: half the memory of float32)."""
    import torch

    from .export import load_source

    dtype = torch.float32
    if source_dtype:
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(_stored_dtype(src), torch.float32)
    try:
        return load_source(src, hf_config, dtype)
    except UnsupportedModel as exc:
        raise ConvertError(str(exc)) from None
    except Exception as exc:  # safetensors, torch and transformers each raise their own types
        raise ConvertError(f"{src}: transformers cannot load it: {type(exc).__name__}: {exc}") from None


def _stored_dtype(src: Path) -> str:
    from .checkpoint import Checkpoint, CheckpointError

    try:
        checkpoint = Checkpoint(src)
    except CheckpointError:
        return "F32"
    dtype = checkpoint.dtype()
    checkpoint.close()
    return dtype


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


def estimate_bytes(src: Path, hf_config: dict[str, Any], quant: str, gqa: bool = False) -> int:
    """Peak disk use while converting. The GQA builder writes only the result (bytes per parameter:
    ~1.05 int8, ~0.55 int4, 4 float; the embedding table once more as int8 rows). The export path
    writes the float32 graph (plus a transposed copy of tied embeddings), and the quantized graph beside
    it until the float32 one is deleted."""
    params = parameter_count(src)
    embedding = int(hf_config.get("vocab_size", 0)) * int(hf_config.get("hidden_size", 0))
    if gqa:
        per_param = {"int8": 1.05, "int4": 0.55}.get(quant, 4.0)
        return int((params + embedding) * per_param * 1.1) + 64 * 2**20
    float32 = params * 4
    if hf_config.get("tie_word_embeddings"):
        float32 += embedding * 4
    quantized = float32 // 2 if quant != "none" else 0
    return int((float32 + quantized) * 1.1) + 64 * 2**20


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
