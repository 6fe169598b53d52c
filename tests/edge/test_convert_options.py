"""ConvertOptions: what `dsnode convert` can be asked for, checked before anything is read."""

from __future__ import annotations

import pytest
from dsnode.edge.convert_options import ConvertError, ConvertOptions


@pytest.mark.parametrize(("quant", "zero_points", "symmetric"), [
    ("int8", "auto", True), ("int4", "auto", False),  # auto: zero points where they lower the logit error
    ("int8", "yes", False), ("int4", "no", True),
])
def test_zero_points_resolve_per_quantization(quant, zero_points, symmetric):
    options = ConvertOptions(quant=quant, zero_points=zero_points)
    options.check()
    assert options.symmetric is symmetric
    assert options.weights({})["symmetric"] is symmetric


def test_an_unknown_zero_points_choice_is_refused_naming_the_choices():
    with pytest.raises(ConvertError, match=r"--zero-points 'maybe': choose one of auto, yes, no"):
        ConvertOptions(zero_points="maybe").check()


def test_the_kv_cache_is_float_unless_int8_is_asked_for():
    assert ConvertOptions().kv_cache_description() == {}
    described = ConvertOptions(kv_cache="int8").kv_cache_description()
    assert described["dtype"] == "int8" and described["margin"] > 1.0


@pytest.mark.parametrize(("options", "message"), [
    (ConvertOptions(kv_cache="fp8"), r"--kv-cache 'fp8': choose one of float, int8"),
    (ConvertOptions(kv_cache="int8", target="cuda"), r"--kv-cache int8 is built for --target cpu .*--target cuda"),
    (ConvertOptions(kv_cache="int8", quant="int8-dynamic"), r"--kv-cache int8 .*--quant int8-dynamic"),
])
def test_an_int8_kv_cache_is_refused_where_it_is_not_built(options, message):
    with pytest.raises(ConvertError, match=message):
        options.check()


def test_calibration_text_is_for_the_int8_cache_alone(tmp_path):
    text = tmp_path / "domain.txt"
    text.write_text("SELECT name FROM users WHERE id = 7;\n")
    with pytest.raises(ConvertError, match=r"--calibration-text .*domain.txt: only --kv-cache int8 is calibrated"):
        ConvertOptions(calibration_text=text).check()
    ConvertOptions(kv_cache="int8", calibration_text=text).check()


@pytest.mark.parametrize(("content", "message"), [
    (None, r"No such file or directory"),
    (b"\n \n\t\n", r"no text in it"),
    (b"caf\xe9 au lait", r"not UTF-8 text \(byte 3\)"),
])
def test_a_calibration_text_that_cannot_be_used_is_refused_naming_the_file(tmp_path, content, message):
    text = tmp_path / "calibration.txt"
    if content is not None:
        text.write_bytes(content)
    with pytest.raises(ConvertError, match=rf"--calibration-text {text}: {message}"):
        ConvertOptions(kv_cache="int8", calibration_text=text).check()


def test_the_manifest_says_what_the_cache_was_calibrated_on(tmp_path):
    assert ConvertOptions(kv_cache="int8").kv_cache_description()["calibration"]["text"] == "built-in sample texts"
    text = tmp_path / "domain.txt"
    text.write_text("first passage\n\nsecond passage\nstill the second\n\n\nthird\n")
    described = ConvertOptions(kv_cache="int8", calibration_text=text).kv_cache_description()["calibration"]
    assert described["text"] == str(text) and described["passages"] == 3 and len(described["sha256"]) == 64


@pytest.mark.parametrize("threads", [0, -2])
def test_fewer_than_one_thread_is_refused(threads):
    with pytest.raises(ConvertError, match=rf"--threads {threads}: at least 1"):
        ConvertOptions(threads=threads).check()


def test_the_command_line_takes_threads_and_refuses_zero_before_reading(dense_dir, tmp_path):
    from tests.edge.conftest import convert_cli

    refused = convert_cli(str(dense_dir), str(tmp_path / "zero"), "--threads", "0", "--quiet")
    assert refused.code == 1
    assert "dsnode convert: error: --threads 0: at least 1" in refused.stderr
    assert not (tmp_path / "zero").exists()
    done = convert_cli(str(dense_dir), str(tmp_path / "two"), "--threads", "2")
    assert done.code == 0, done.stderr
    assert "weights prepared on 2 threads" in done.stderr  # the export stage's progress line says so
    assert (tmp_path / "two" / "model.onnx").is_file()
