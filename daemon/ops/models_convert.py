"""`dsnode models pull … --convert int8`: the pulled checkpoint, converted by `dsnode convert` into a
version of its own, `NAME-int8@VERSION` (same VERSION: the conversion's lineage shows in its name).

The only coupling to the converter is its public entry point, `dsnode.edge.convert.convert_model`
(and its ConvertError): its output format is its own business.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import replace

from ..store.layout import ModelStore, StoredVersion, StoreError
from ..store.manifest import FileRecord, hash_file
from ..store.pull import PullOptions, Say, already_installed, install
from ..store.staging import Staging

CONVERTER_NEEDS = ("torch", "transformers", "onnx", "onnxruntime")


def check_converter_installed() -> None:
    """Before a long pull: the converter's packages must be there (`dsnode[convert]`)."""
    missing = [m for m in CONVERTER_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise StoreError(f"--convert needs dsnode convert's packages ({', '.join(missing)} missing): "
                         "pip install 'dsnode[convert]'")


def convert_into_store(store: ModelStore, source: StoredVersion, quant: str, options: PullOptions,
                       say: Say) -> StoredVersion:
    from dsnode.edge.convert import ConvertError, convert_model

    target = replace(options, name=f"{source.name}-{quant}")
    existing = already_installed(store, target, source.version, say)
    if existing is not None:
        return existing
    say(f"converting {source.ref} to {target.name}@{source.version} (dsnode convert --quant {quant})")
    staging = Staging(store.partial_root(target.name) / source.version)
    with staging:
        converted = staging.folder / "converted"
        shutil.rmtree(converted, ignore_errors=True)  # what a killed conversion left: convert starts afresh
        try:
            convert_model(source.path, converted, quant=quant)
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
        source_info = {"kind": "convert", "from": source.ref, "quantization": quant,
                       "from_content_sha256": source.manifest.content_sha256}
        return install(store, staging, source.version, source_info, target)
