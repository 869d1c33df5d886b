"""lifecycle.ggufinfo: a GGUF model's metadata from its header, on files gguf.GGUFWriter writes."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape

from lifecycle.ggufinfo import ModelInfo, read_info, shard_paths

DEFAULT_MODEL = Path.home() / ".cache/llama-gguf-inference/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def tensor(writer: GGUFWriter, name: str, shape: tuple[int, ...], kind: GGMLQuantizationType) -> None:
    """A tensor of `shape` (in numpy order) and ggml type `kind`, its bytes all zero."""
    if kind == GGMLQuantizationType.F32:
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    else:
        data = np.zeros(quant_shape_to_byte_shape(shape, kind), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=kind)  # the element shape is found from the byte shape


def write(
    path: Path,
    arch: str = "llama",
    *,
    name: str | None = "Tiny Llama",
    context: int | None = 4096,
    file_type: int | None = LlamaFileType.MOSTLY_Q4_K_M,
    parameter_count: int | None = None,
    tensors: tuple[tuple[str, tuple[int, ...], GGMLQuantizationType], ...] = (
        ("token_embd.weight", (8, 256), GGMLQuantizationType.Q4_K),
        ("blk.0.attn_q.weight", (4, 256), GGMLQuantizationType.Q6_K),
        ("output_norm.weight", (256,), GGMLQuantizationType.F32),
    ),
    split_max_tensors: int = 0,
) -> None:
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if name is not None:
        writer.add_name(name)
    if context is not None:
        writer.add_context_length(context)
    if file_type is not None:
        writer.add_file_type(file_type)
    if parameter_count is not None:
        writer.add_uint64("general.parameter_count", parameter_count)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "wörld"])  # skipped, not read
    writer.add_array("tokenizer.ggml.scores", [0.0, 0.5, 1.0, 2.0])
    writer.add_uint32("llama.block_count", 1)
    for tensor_name, shape, kind in tensors:
        tensor(writer, tensor_name, shape, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_every_field(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write(path)
    info = read_info(path)
    assert info == ModelInfo(
        architecture="llama", parameters=8 * 256 + 4 * 256 + 256, quantization="Q4_K_M", context_length=4096,
        size_bytes=path.stat().st_size, name="Tiny Llama", shards=1,
    )
    assert json.loads(json.dumps(info.as_dict())) == {
        "architecture": "llama", "parameters": 3328, "quantization": "Q4_K_M", "context_length": 4096,
        "size_bytes": path.stat().st_size, "name": "Tiny Llama", "shards": 1,
    }


def test_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write(path, "qwen2", context=32768, file_type=LlamaFileType.MOSTLY_F16,
          tensors=(("a", (3, 5), GGMLQuantizationType.F16), ("b", (7,), GGMLQuantizationType.F32)))
    info = read_info(path)
    reader = gguf.GGUFReader(path)
    assert info is not None
    assert info.architecture == reader.fields["general.architecture"].contents() == "qwen2"
    assert info.context_length == reader.fields["qwen2.context_length"].contents() == 32768
    assert info.parameters == sum(int(t.n_elements) for t in reader.tensors) == 22
    assert info.quantization == "F16"


@pytest.mark.parametrize(
    ("file_type", "expected"),
    [
        (LlamaFileType.ALL_F32, "F32"),
        (LlamaFileType.MOSTLY_F16, "F16"),
        (LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
        (LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
        (LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS"),
        (LlamaFileType.MOSTLY_BF16, "BF16"),
        # not stated, guessed or unknown: the type most of the weights have (by elements, not by tensor count)
        (None, "Q4_K"),
        (LlamaFileType.GUESSED, "Q4_K"),
        (999, "Q4_K"),
    ],
)
def test_quantization(tmp_path: Path, file_type: int | None, expected: str) -> None:
    path = tmp_path / "m.gguf"
    write(path, file_type=file_type, tensors=(
        ("big", (16, 256), GGMLQuantizationType.Q4_K),
        ("norm1", (8,), GGMLQuantizationType.F32),
        ("norm2", (8,), GGMLQuantizationType.F32),
    ))
    info = read_info(path)
    assert info is not None and info.quantization == expected


def test_stated_parameter_count_and_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write(path, parameter_count=135_000_000)
    info = read_info(path)
    assert info is not None and info.parameters == 135_000_000
    write(path, name=None, context=None, file_type=None, tensors=())
    info = read_info(path)
    assert info is not None
    assert (info.architecture, info.name, info.context_length, info.parameters, info.quantization) == (
        "llama", None, None, 0, None)


def test_multi_shard(tmp_path: Path) -> None:
    write(tmp_path / "big.gguf", split_max_tensors=1)
    shards = sorted(tmp_path.glob("big-*.gguf"))
    assert [p.name for p in shards] == [f"big-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert shard_paths(shards[1]) == shards
    total = sum(p.stat().st_size for p in shards)
    for shard in shards:  # any shard names the model
        info = read_info(shard)
        assert info is not None
        assert (info.size_bytes, info.shards, info.parameters) == (total, 3, 3328)
        assert (info.architecture, info.name, info.quantization, info.context_length) == (
            "llama", "Tiny Llama", "Q4_K_M", 4096)


def test_a_missing_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "big.gguf", split_max_tensors=1)
    (tmp_path / "big-00003-of-00003.gguf").unlink()
    with caplog.at_level(logging.WARNING):
        assert read_info(tmp_path / "big-00001-of-00003.gguf") is None
    assert "big-00003-of-00003.gguf is missing" in caplog.text


def test_shard_paths() -> None:
    assert shard_paths(Path("/m/x.gguf")) == [Path("/m/x.gguf")]
    assert shard_paths(Path("/m/x-00002-of-00002.gguf")) == [Path("/m/x-00001-of-00002.gguf"),
                                                             Path("/m/x-00002-of-00002.gguf")]
    assert shard_paths(Path("/m/x-00003-of-00002.gguf")) == [Path("/m/x-00003-of-00002.gguf")]


def test_bad_files_are_none_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.gguf"
    write(good)
    data = good.read_bytes()
    header_end = data.index(b"output_norm.weight") + 40  # past the last tensor info
    cases = {
        "missing.gguf": None,
        "empty.gguf": b"",
        "garbage.gguf": b"this is not a model at all" * 10,
        "magic-only.gguf": b"GGUF",
        "bad-version.gguf": b"GGUF" + (99).to_bytes(4, "little") + data[8:],
        "huge-count.gguf": data[:8] + (1 << 40).to_bytes(8, "little") + data[16:],
        "random.gguf": b"GGUF" + bytes(range(256)) * 4,
    }
    for cut in (6, 20, 100, header_end - 60, header_end + 64, len(data) - 1):  # the header, then the data cut off
        cases[f"cut-{cut}.gguf"] = data[:cut]
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lifecycle.ggufinfo"):
            assert read_info(path) is None, name
        assert len(caplog.records) == 1 and name in caplog.text, name
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    assert read_info(folder) is None
    (tmp_path / "longer.gguf").write_bytes(data + b"\0" * 100)  # more than the tensors need is fine
    assert read_info(tmp_path / "longer.gguf") is not None


def test_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write(path)
    expected = read_info(path)
    results: list[ModelInfo | None] = []
    threads = [threading.Thread(target=lambda: results.append(read_info(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 8


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the default model is not downloaded")
def test_the_default_model() -> None:
    info = read_info(DEFAULT_MODEL)
    assert info is not None
    assert (info.architecture, info.quantization, info.context_length) == ("llama", "Q4_1", 8192)
    assert 130e6 < info.parameters < 140e6
    assert info.size_bytes == DEFAULT_MODEL.stat().st_size
