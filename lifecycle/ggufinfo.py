"""What a GGUF model file is: architecture, parameters, quantization, context length, size, name.

`read_info(path)` reads only the file's header (the key-value metadata and the tensor infos), never tensor data,
and never raises: a file that is not a complete GGUF model (garbage, a header cut short, shorter than its tensors'
data needs, as a download cut off is; a shard missing) is None, with one warning. It is a pure function of the
files (no shared state; each call opens and closes its own handles), so the gateway may call it from any thread
(asyncio.to_thread).

Why not gguf.GGUFReader: it builds a numpy view for every item of every metadata array, so a 128k-token vocabulary
(tokens and merges) takes seconds and hundreds of MB to open. The header is walked here with `struct` instead,
arrays skipped without being built; the `gguf` package still supplies the names (GGUFValueType,
GGMLQuantizationType, LlamaFileType), and the tests check the result against files GGUFWriter writes.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, LlamaFileType

log = logging.getLogger("lifecycle.ggufinfo")

MAGIC = b"GGUF"
MAX_DIMS = 8  # ggml has 4; more is a corrupt file
MAX_ARRAY_DEPTH = 4
# Far above any real model (a 256k-token vocabulary, 10k tensors), so that a corrupt count fails fast instead of
# walking gigabytes of tensor data 8 bytes at a time.
MAX_ARRAY_ITEMS = 1 << 24
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
SHARD = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
SHARD_NAME = "{}-{:05d}-of-{:05d}.gguf"

# GGUF value types -> struct format (little-endian by default; "<" or ">" is prefixed)
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_SIZES = {kind: struct.calcsize("<" + fmt) for kind, fmt in _SCALARS.items()}


class GGUFError(ValueError):
    """Why a file is not a readable GGUF header (no content of the file in it, beyond sizes and types)."""


@dataclass(frozen=True)
class ModelInfo:
    architecture: str | None  # general.architecture, e.g. "llama"
    parameters: int  # general.parameter_count when present, else the sum of every tensor's element count
    quantization: str | None  # general.file_type's name ("Q4_K_M", "F16"), else the tensor type most weights have
    context_length: int | None  # <architecture>.context_length: what the model was trained for
    size_bytes: int  # the file's size; of every shard together for a split model
    name: str | None = None  # general.name
    shards: int = 1

    def as_dict(self) -> dict[str, Any]:
        """For JSON: plain str, int and None values."""
        return asdict(self)


@dataclass(frozen=True)
class _Header:
    metadata: dict[str, object]  # scalar and string values; arrays are skipped
    tensor_elements: dict[str, int]  # GGML type name -> elements of that type
    parameters: int


class _Cursor:
    """Reads the header from a buffer, checking every read against its end."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.end = len(data)
        self.at = 0
        self.order = "<"

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > self.end:
            raise GGUFError(f"truncated at byte {self.at}")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.at)
        self.at += size
        return value

    def skip(self, size: int) -> None:
        if size < 0 or self.at + size > self.end:
            raise GGUFError(f"truncated at byte {self.at}")
        self.at += size

    def string(self) -> str:
        length = self.take("Q")
        start = self.at
        self.skip(length)
        return bytes(self.data[start : self.at]).decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.skip(self.take("Q"))

    def _skip_strings(self, count: int) -> None:
        """`count` strings, as fast as Python walks them: a vocabulary and its merges are ~10^5-10^6 of them."""
        at, end, data = self.at, self.end, self.data
        length = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            if at + 8 > end:
                raise GGUFError(f"truncated at byte {at}")
            at += 8 + length(data, at)[0]
        if at > end:
            raise GGUFError(f"truncated at byte {self.at}")
        self.at = at

    def value(self, kind: int, depth: int = 0) -> object:
        """A scalar or string; arrays are skipped (None), walking only the string lengths they hold."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind != GGUFValueType.ARRAY:
            raise GGUFError(f"unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError("arrays nested too deep")
        item, count = self.take("I"), self.take("Q")
        if item in _SIZES:
            self.skip(count * _SIZES[item])
            return None
        if count > MAX_ARRAY_ITEMS:
            raise GGUFError(f"an array of {count} items")
        if item == GGUFValueType.STRING:
            self._skip_strings(count)
        elif item == GGUFValueType.ARRAY:
            for _ in range(count):
                self.value(item, depth + 1)
        else:
            raise GGUFError(f"unknown array item type {item}")
        return None


def _header(data: mmap.mmap | bytes) -> _Header:
    cur = _Cursor(data)
    if bytes(data[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (no GGUF magic)")
    cur.at = 4
    version = cur.take("I")
    if version & 0xFFFF == 0 and version != 0:  # written big-endian (as GGUFReader detects it)
        cur.order = ">"
        cur.at = 4
        version = cur.take("I")
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    tensor_count, kv_count = cur.take("Q"), cur.take("Q")
    if tensor_count > MAX_TENSORS or kv_count > MAX_KEYS:
        raise GGUFError(f"implausible counts ({tensor_count} tensors, {kv_count} keys)")
    metadata: dict[str, object] = {}
    for _ in range(kv_count):
        key = cur.string()
        value = cur.value(cur.take("I"))
        if value is not None:
            metadata[key] = value
    elements: Counter[str] = Counter()
    parameters = 0
    data_needed = 0  # bytes of tensor data, from the data section's start, that the tensor infos point into
    for _ in range(tensor_count):
        cur.skip_string()  # the tensor's name
        dims = cur.take("I")
        if dims > MAX_DIMS:
            raise GGUFError(f"a tensor with {dims} dimensions")
        count = 1
        for _ in range(dims):
            count *= cur.take("Q")
        kind = cur.take("I")
        offset = cur.take("Q")  # where the data is: it is never read, only checked to be in the file
        try:
            quant = GGMLQuantizationType(kind)
        except ValueError:
            elements[f"type {kind}"] += count
        else:
            elements[quant.name] += count
            block, block_bytes = GGML_QUANT_SIZES[quant]
            data_needed = max(data_needed, offset + -(-count // block) * block_bytes)
        parameters += count
    alignment = _int(metadata.get("general.alignment")) or GGUF_DEFAULT_ALIGNMENT
    data_start = -(-cur.at // alignment) * alignment
    if tensor_count and data_start + data_needed > cur.end:
        raise GGUFError(f"truncated: {cur.end} bytes, its tensors need {data_start + data_needed}")
    return _Header(metadata, dict(elements), parameters)


def _read_header(path: Path) -> _Header:
    with path.open("rb") as handle:
        if path.stat().st_size == 0:
            raise GGUFError("empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _header(data)


def shard_paths(path: Path) -> list[Path]:
    """Every shard of a split model (`x-00001-of-00003.gguf` -> its three files), or [path]."""
    match = SHARD.fullmatch(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    if count < 1 or not 1 <= int(match["no"]) <= count:
        return [path]
    return [path.with_name(SHARD_NAME.format(match["prefix"], n, count)) for n in range(1, count + 1)]


def _quantization(metadata: dict[str, object], elements: dict[str, int]) -> str | None:
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            kind = LlamaFileType(file_type)
        except ValueError:
            kind = None
        if kind is not None and kind is not LlamaFileType.GUESSED:
            return "F32" if kind is LlamaFileType.ALL_F32 else kind.name.removeprefix("MOSTLY_")
    if not elements:
        return None
    # the type most of the weights are in (by elements: the many small F32 norms do not count for much)
    return max(elements.items(), key=lambda item: item[1])[0]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def read_info(path: Path) -> ModelInfo | None:
    """The model's metadata from its GGUF header; None (and one warning) for a file that cannot be read as one.

    For a split model, `path` may be any of its shards: the metadata is the first shard's, the size the sum of all
    of them, and the parameter count (when the file does not state it) covers every shard's tensors."""
    try:
        return _read_info(Path(path))
    except Exception as exc:  # never raises: a bad file is "no information", and says why once
        reason = str(exc) if isinstance(exc, GGUFError) else type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            reason += f": {exc.strerror}"
        log.warning("cannot read GGUF metadata from %s (%s)", path, reason)
        return None


def _read_info(path: Path) -> ModelInfo:
    paths = shard_paths(path)
    first = _read_header(paths[0])
    parameters, elements = first.parameters, dict(first.tensor_elements)
    size = paths[0].stat().st_size
    for shard in paths[1:]:
        try:
            size += shard.stat().st_size
        except FileNotFoundError:
            raise GGUFError(f"shard {shard.name} is missing") from None
        header = _read_header(shard)  # small (tensor infos), and it checks the shard is whole
        parameters += header.parameters
        for kind, count in header.tensor_elements.items():
            elements[kind] = elements.get(kind, 0) + count
    metadata = first.metadata
    architecture = _str(metadata.get("general.architecture"))
    stated = _int(metadata.get("general.parameter_count"))
    context = _int(metadata.get(f"{architecture}.context_length")) if architecture else None
    return ModelInfo(
        architecture=architecture,
        parameters=stated if stated is not None else parameters,
        quantization=_quantization(metadata, elements),
        context_length=context,
        size_bytes=size,
        name=_str(metadata.get("general.name")),
        shards=len(paths),
    )
