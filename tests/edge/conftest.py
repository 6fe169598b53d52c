"""The bundled dense model converted once per session (int8 and float32, a few seconds each), and
engines over it: the ONNX engine under test and the transformers engine it must answer like."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from dsnode.config import BatchingSection, ModelSection
from dsnode.inference.engine import Delta, Engine, GenerationRequest, SamplingParams

BATCHING = BatchingSection(max_batch_tokens=4096)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(dense_dir: Path, folder: Path) -> None:
    """The bundled model's tokenizer files into a test checkpoint (its 512 ids fit any vocabulary >= 512)."""
    for name in TOKENIZER_FILES:
        shutil.copy(dense_dir / name, folder / name)


def convert_quietly(src: Path, dst: Path, quant: str) -> Any:
    from dsnode.edge.convert import STAGES, convert_model
    from dsnode.edge.progress import Progress

    return convert_model(src, dst, quant=quant, progress=Progress(STAGES, enabled=False))


@pytest.fixture(scope="session")
def int8_conversion(tmp_path_factory, dense_dir):
    return convert_quietly(dense_dir, tmp_path_factory.mktemp("onnx") / "dense-int8", "int8")


@pytest.fixture(scope="session")
def cuda_conversions(tmp_path_factory, dense_dir) -> dict[str, Path]:
    """int8 and int4 folders converted for the CUDA provider (float16), validated here on the CPU."""
    from dsnode.edge.convert import STAGES, ConvertOptions, convert_model
    from dsnode.edge.progress import Progress

    root = tmp_path_factory.mktemp("cuda")
    return {quant: convert_model(dense_dir, root / quant, progress=Progress(STAGES, enabled=False),
                                 options=ConvertOptions(quant=quant, target="cuda")).path
            for quant in ("int8", "int4")}


@pytest.fixture(scope="session")
def int8_dynamic_dir(tmp_path_factory, dense_dir) -> Path:
    """The traced-export graph with MatMulInteger weights (the format before MatMulNBits)."""
    return convert_quietly(dense_dir, tmp_path_factory.mktemp("onnx") / "dense-int8-dynamic", "int8-dynamic").path


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str


def convert_cli(*args: str) -> CliRun:
    """`dsnode convert ARGS` in this process (the real command line, without a second torch import)."""
    from dsnode.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert", *args])
    return CliRun(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def fp32_cli_run(tmp_path_factory, dense_dir) -> tuple[Path, CliRun]:
    dst = tmp_path_factory.mktemp("onnx") / "dense-fp32"
    return dst, convert_cli(str(dense_dir), str(dst), "--quant", "none")


@pytest.fixture(scope="session")
def int8_dir(int8_conversion) -> Path:
    return int8_conversion.path


@pytest.fixture(scope="session")
def fp32_dir(fp32_cli_run) -> Path:
    dst, run = fp32_cli_run
    assert run.code == 0, run.stderr
    return dst


def model_section(path: Path, backend: str = "onnx", **overrides: Any) -> ModelSection:
    return ModelSection(name="tiny", path=path, backend=backend, threads=1, **overrides)  # type: ignore[arg-type]


async def loaded(engine: Engine) -> Engine:
    await engine.load()
    return engine


def onnx_engine(path: Path, batching: BatchingSection = BATCHING, **overrides: Any) -> Engine:
    from dsnode.edge.onnx_engine import OnnxEngine

    return OnnxEngine(model_section(path, **overrides), batching)


@pytest_asyncio.fixture(scope="session")
async def int8_engine(int8_dir) -> AsyncIterator[Engine]:
    engine = await loaded(onnx_engine(int8_dir))
    yield engine
    await engine.close()


@pytest_asyncio.fixture(scope="session")
async def fp32_engine(fp32_dir) -> AsyncIterator[Engine]:
    engine = await loaded(onnx_engine(fp32_dir))
    yield engine
    await engine.close()


@pytest_asyncio.fixture(scope="session")
async def torch_engine(dense_dir) -> AsyncIterator[Engine]:
    """The central engine on the source model: what the edge must answer like."""
    from dsnode.central.transformers_engine import TransformersEngine

    engine = await loaded(TransformersEngine(model_section(dense_dir, "transformers"), BATCHING))
    yield engine
    await engine.close()


async def run(engine: Engine, prompt: str | Sequence[int], request_id: str = "r", **params: Any) -> list[Delta]:
    """Every delta of one generation of `prompt`: a text (completion-style encoding) or token ids."""
    ids = tuple(engine.tokenizer.encode(prompt)) if isinstance(prompt, str) else tuple(prompt)
    request = GenerationRequest(request_id, ids, SamplingParams(**{"temperature": 0.0, **params}))
    return [delta async for delta in engine.generate(request)]


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


async def run_all(engine: Engine, prompts: list[str], **params: Any) -> list[list[Delta]]:
    return list(await asyncio.gather(*(run(engine, p, f"c{i}", **params) for i, p in enumerate(prompts))))


@pytest.fixture(scope="session")
def int8_cache_dirs(tmp_path_factory, dense_dir) -> dict[str, Path]:
    """`--kv-cache int8` over float32 weights ("none": the cache's rounding alone), over int8 weights, and
    over int8 weights in blocks of 64 ("int8-b64": the CPU configuration docs/edge.md recommends),
    converted by the command line."""
    root = tmp_path_factory.mktemp("kv8")
    folders = {}
    for name, quant, block in (("none", "none", ()), ("int8", "int8", ()), ("int8-b64", "int8", ("--block-size", "64"))):
        run = convert_cli(str(dense_dir), str(root / name), "--quant", quant, *block, "--kv-cache", "int8", "--quiet")
        assert run.code == 0, run.stderr
        folders[name] = root / name
    return folders


def as_converted_before_last_position(folder: Path, to: Path) -> Path:
    """A copy of `folder` as converted before 2026-12-01: a constant -1 where the graph now has the
    last_position input, and the manifest's checksum of the graph updated."""
    import onnx
    from onnx import numpy_helper

    old = Path(shutil.copytree(folder, to))
    model = onnx.load(str(old / "model.onnx"), load_external_data=False)
    (positions,) = [i for i in model.graph.input if i.name == "last_position"]
    model.graph.input.remove(positions)
    model.graph.initializer.append(numpy_helper.from_array(np.array(-1, np.int64), "last_position"))
    onnx.save(model, str(old / "model.onnx"))
    manifest = json.loads((old / "manifest.json").read_text())
    graph = (old / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(graph).hexdigest(), "bytes": len(graph)}
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old
