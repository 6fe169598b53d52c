"""`dsnode models pull … --convert int8|int4 [--target auto|cpu|cuda]`: the pulled checkpoint, converted by
`dsnode convert` into a version of its own, `NAME-int8@VERSION` (`NAME-int8-cuda@VERSION` for the CUDA
provider; same VERSION: the conversion's lineage shows in its name). A converted folder serves one
target, so `auto` picks the one this host will serve with: cuda where onnxruntime has its CUDA provider
(`dsnode[edge-gpu]`) and an NVIDIA GPU is present, else cpu.

The only coupling to the converter is its public entry point, `dsnode.edge.convert.convert_model`
(and its ConvertError): its output format is its own business.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..store.layout import ModelStore, StoredVersion, StoreError
from ..store.manifest import FileRecord, hash_file
from ..store.pull import PullOptions, Say, already_installed, install
from ..store.staging import Staging

CONVERTER_NEEDS = ("torch", "transformers", "onnx", "onnxruntime")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the NVIDIA driver drives


def check_converter_installed() -> None:
    """Before a long pull: the converter's packages must be there (`dsnode[convert]`)."""
    missing = [m for m in CONVERTER_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise StoreError(f"--convert needs dsnode convert's packages ({', '.join(missing)} missing): "
                         "pip install 'dsnode[convert]'")


def convert_target(requested: str, say: Say) -> str:
    """`--target`: cpu or cuda as asked; `auto` → what this host will serve with."""
    if requested != "auto":
        return requested
    import onnxruntime

    has_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    has_gpu = NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir())
    target = "cuda" if has_provider and has_gpu else "cpu"
    why = ("onnxruntime's CUDA provider and an NVIDIA GPU" if target == "cuda" else
           "no NVIDIA GPU" if has_provider else "onnxruntime without its CUDA provider (dsnode[edge-gpu] has it)")
    say(f"--target auto: {target} ({why} here)")
    return target


def convert_into_store(store: ModelStore, source: StoredVersion, quant: str, target_provider: str,
                       options: PullOptions, say: Say) -> StoredVersion:
    from dsnode.edge.convert import ConvertError, ConvertOptions, convert_model

    suffix = f"-{quant}" + ("-cuda" if target_provider == "cuda" else "")
    target = replace(options, name=f"{source.name}{suffix}")
    existing = already_installed(store, target, source.version, say)
    if existing is not None:
        return existing
    say(f"converting {source.ref} to {target.name}@{source.version} "
        f"(dsnode convert --quant {quant} --target {target_provider})")
    staging = Staging(store.partial_root(target.name) / source.version)
    with staging:
        converted = staging.folder / "converted"
        shutil.rmtree(converted, ignore_errors=True)  # what a killed conversion left: convert starts afresh
        try:
            convert_model(source.path, converted, options=ConvertOptions(quant=quant, target=target_provider))
        except ConvertError as exc:
            staging.discard()
            raise StoreError(f"dsnode convert {source.ref}: {exc}") from None
        except Exception as exc:  # torch/onnx failures: say what broke; nothing was installed
            staging.discard()
            raise StoreError(f"dsnode convert {source.ref}: {type(exc).__name__}: {exc}") from None
        staging.files.rmdir()  # empty: the converter's folder takes its place
        os.rename(converted, staging.files)
        staging.verified = {p.relative_to(staging.files).as_posix(): FileRecord(p.stat().st_size,
                                                                                hash_file(p).sha256.hexdigest())
                            for p in sorted(staging.files.rglob("*")) if p.is_file()}
        source_info = {"kind": "convert", "from": source.ref, "quantization": quant, "target": target_provider,
                       "from_content_sha256": source.manifest.content_sha256}
        return install(store, staging, source.version, source_info, target)
