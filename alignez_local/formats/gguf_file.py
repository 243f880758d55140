"""A strict, bounded GGUF reader (v2/v3, little-endian).

GGUF files reach us from downloads, so every read here treats the bytes as hostile: each length
and count is checked against the bytes actually left in the file *before* anything is allocated,
counts are capped, and every problem becomes one ``AlignezError`` line. The file is memory-mapped
and parsed with ``struct.unpack_from``, so identifying a multi-GB model touches only its header.

We parse GGUF ourselves instead of using ``gguf.GGUFReader`` because that reader trusts the
counts in the file: on an 8 MiB file with a forged string-array count it took 15 s and 1.6 GB of
memory, and longer on larger files. The rules below follow ggml's
``gguf_init_from_file``, so that what we accept, llama.cpp accepts. The ``gguf`` package is still
used for writing (``GGUFWriter``, in ``gguf_write``) and for its tables of value and tensor types.
Checking every count before use is what makes this module longer than ~400 lines; it holds only
the reader. What kind of file it is (``kinds``) and writing (``gguf_write``) live beside it.
"""

# size: one bounded parser; its limits (counts, lengths, offsets checked before any allocation) read
# best in one place, and the fuzz tests target this one file.

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from alignez_local.errors import AlignezError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
HEADER_SIZE = 24  # magic(4) + version(4) + tensor count(8) + kv count(8)

# Caps far above any real file (a 262k-token vocabulary is the largest metadata seen in practice)
# but low enough that a forged count cannot make us loop or allocate without bound.
MAX_KV = 1_000_000
MAX_TENSORS = 1_000_000
MAX_ARRAY_ITEMS = 1 << 24
MAX_STRING_BYTES = 64 << 20
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_ALIGNMENT = 1 << 16
DEFAULT_MAX_DATA_BYTES = 1 << 30
_INT64_MAX = (1 << 63) - 1

# Files whose mmap fails (some network or special filesystems) are read into memory only up to this.
_MAX_UNMAPPED_READ = 256 << 20



# struct formats of the scalar GGUF value types (all little-endian).
_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPE: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
_INT_TYPES = frozenset(
    (
        GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
    )
)
_FLOAT_TYPES = frozenset((GGUFValueType.FLOAT32, GGUFValueType.FLOAT64))

# Tests set this to True so that a bug in the parser shows up as itself instead of being turned
# into a user-facing "could not be parsed" line.
_RAISE_INTERNAL_ERRORS = False


class ValueType(NamedTuple):
    """The GGUF type of one metadata value: ``kind``, and ``item`` for an array's elements."""

    kind: GGUFValueType
    item: GGUFValueType | None = None

    def __str__(self) -> str:
        """Return the name used in messages: ``UINT32``, ``STRING``, ``ARRAY[STRING]``..."""
        return f"ARRAY[{self.item.name}]" if self.item is not None else self.kind.name

    @property
    def is_int(self) -> bool:
        """Return True for a scalar integer type (not bool)."""
        return self.kind in _INT_TYPES

    @property
    def is_float(self) -> bool:
        """Return True for a scalar FLOAT32 or FLOAT64."""
        return self.kind in _FLOAT_TYPES


class GGUFTensor(NamedTuple):
    """One tensor: numpy-order shape (GGUF's ``ne`` reversed), ggml type name, data or None."""

    shape: tuple[int, ...]
    type_name: str
    data: np.ndarray | None


class GGUFArraySummary(NamedTuple):
    """Stands in for a metadata array that was walked and bounds-checked but not loaded."""

    item_type: GGUFValueType
    count: int


@dataclass(frozen=True)
class GGUFContents:
    """What a GGUF file holds: metadata, its value types, and the tensors (data for F32 only)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, ValueType]
    tensors: dict[str, GGUFTensor]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        """Return ``general.architecture`` when it is a string, else None."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _TensorInfo(NamedTuple):
    """One entry of the tensor table: GGUF-order dims, ggml type, offset in the data section, size."""

    name: str
    ne: tuple[int, ...]
    ttype: GGMLQuantizationType
    offset: int
    nbytes: int


class _Parser:
    """Sequential reader over a buffer that checks every read against the file size first."""

    def __init__(self, buf: Any, size: int, path: Path, want_arrays: bool) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0
        self.want_arrays = want_arrays

    def need(self, n: int, what: str = "header") -> None:
        """Return nothing; raise the 'truncated' error unless ``n`` more bytes exist."""
        if n < 0 or self.pos + n > self.size:
            raise AlignezError(
                f"{self.path} is truncated ({self.size} bytes, {what} needs {self.pos + n}); download it again"
            )

    def scalar(self, vtype: GGUFValueType) -> Any:
        """Return one scalar value of GGUF type ``vtype`` and advance."""
        fmt = _SCALAR_FMT[vtype]
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        if vtype == GGUFValueType.BOOL:
            return bool(value)
        return value

    def u32(self) -> int:
        """Return the next little-endian uint32."""
        return int(self.scalar(GGUFValueType.UINT32))

    def u64(self) -> int:
        """Return the next little-endian uint64."""
        return int(self.scalar(GGUFValueType.UINT64))

    def string(self, what: str) -> str:
        """Return the next length-prefixed UTF-8 string (invalid bytes replaced)."""
        start = self.pos
        n = self.u64()
        if n > MAX_STRING_BYTES:
            raise AlignezError(
                f"{self.path} is corrupt: {what} at byte {start} claims {n} bytes "
                f"(limit {MAX_STRING_BYTES}); download it again"
            )
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        # ggml does not validate UTF-8 either; replacing keeps odd names displayable.
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        """Advance over one length-prefixed string without decoding it."""
        n = self.u64()
        if n > MAX_STRING_BYTES:
            raise AlignezError(f"{self.path} is corrupt: a string claims {n} bytes; download it again")
        self.need(n)
        self.pos += n

    def value_type(self, key: str) -> GGUFValueType:
        """Return the next value type code, validated."""
        t = self.u32()
        if t not in _SCALAR_FMT and t not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise AlignezError(
                f"{self.path} is corrupt: metadata key {_q(key)} has unknown value type {t}; download it again"
            )
        return GGUFValueType(t)

    def value(self, key: str, vtype: GGUFValueType) -> tuple[Any, ValueType]:
        """Return (value, its type) of one metadata value of type ``vtype``."""
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of {_q(key)}"), ValueType(vtype)
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        return self.scalar(vtype), ValueType(vtype)

    def array(self, key: str) -> tuple[Any, ValueType]:
        """Return (items, type) of the metadata array of ``key``, or a summary without ``want_arrays``."""
        item_type = self.value_type(key)
        if item_type == GGUFValueType.ARRAY:
            # ggml refuses nested arrays, so a control vector or model containing one cannot load.
            raise AlignezError(
                f"{self.path} has a nested metadata array at key {_q(key)}, which llama.cpp cannot read; "
                "use another file"
            )
        count = self.u64()
        if count > MAX_ARRAY_ITEMS:
            raise AlignezError(
                f"{self.path} is corrupt: metadata array {_q(key)} claims {count} items "
                f"(limit {MAX_ARRAY_ITEMS}); download it again"
            )
        vt = ValueType(GGUFValueType.ARRAY, item_type)
        summary = GGUFArraySummary(item_type, count)
        if item_type == GGUFValueType.STRING:
            # Every string costs at least its 8-byte length, so this bounds the loop below.
            self.need(8 * count)
            if not self.want_arrays:
                for _ in range(count):
                    self.skip_string()
                return summary, vt
            label = f"an item of {_q(key)}"
            return [self.string(label) for _ in range(count)], vt
        dtype = np.dtype(_ARRAY_DTYPE[item_type])
        nbytes = dtype.itemsize * count
        self.need(nbytes)
        start = self.pos
        self.pos += nbytes
        if not self.want_arrays:
            return summary, vt
        # Slicing copies the bytes out of the map, so no numpy view keeps the mmap alive.
        arr = np.frombuffer(bytes(self.buf[start : start + nbytes]), dtype=dtype)
        if item_type == GGUFValueType.BOOL:
            arr = arr.astype(bool)
        return arr, vt


def _q(name: str) -> str:
    """Return ``name`` quoted for a message, shortened: a forged key can be megabytes long."""
    return repr(name if len(name) <= 60 else name[:57] + "...")


def _open_checked(path: Path) -> int:
    """Return the size of ``path`` after checking it is an existing regular file (not a FIFO)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise AlignezError(f"no such file: {path}") from None
    except OSError as err:
        raise AlignezError(f"cannot read {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AlignezError(f"{path} is a folder, not a .gguf file; give the path of the file")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or stream forever; only plain files are accepted.
        raise AlignezError(f"{path} is not a regular file; give the path of a .gguf file")
    return st.st_size


def _pad(n: int, alignment: int) -> int:
    """Return ``n`` rounded up to a multiple of ``alignment``."""
    return n + (-n % alignment)


def _parse(
    buf: Any,
    size: int,
    path: Path,
    *,
    want_data: bool,
    want_arrays: bool,
    what: str,
    max_data_bytes: int,
) -> GGUFContents:
    """Return the parsed contents of the GGUF bytes in ``buf`` (``size`` bytes long).

    The steps follow the file: header, key/values, tensor table, then the data section.
    """
    p = _Parser(buf, size, path, want_arrays)
    version, n_tensors, n_kv = _read_header(p, what)
    metadata, value_types = _read_key_values(p, n_kv)
    alignment = _alignment(metadata, value_types, path)
    infos = _read_tensor_infos(p, n_tensors)
    data_offset = _pad(p.pos, alignment)
    _check_data_layout(infos, data_offset, alignment, size, path)
    tensors = _load_tensors(buf, infos, data_offset, path, want_data=want_data, max_data_bytes=max_data_bytes)
    return GGUFContents(
        path=path,
        version=version,
        metadata=metadata,
        value_types=value_types,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
    )


def _read_header(p: _Parser, what: str) -> tuple[int, int, int]:
    """Return (version, tensor count, key/value count) after checking magic, version and caps."""
    path, size, buf = p.path, p.size, p.buf
    if size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        if size < 4 and bytes(buf[:size]) == GGUF_MAGIC[:size]:
            raise AlignezError(
                f"{path} is truncated ({size} bytes, header needs {HEADER_SIZE}); download it again"
            )
        raise AlignezError(f"{path} is not a GGUF file (bad magic); expected {what}")
    p.pos = 4
    p.need(HEADER_SIZE - 4)
    version = p.u32()
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise AlignezError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
        if version == 1:
            raise AlignezError(f"{path} uses GGUF version 1, which is no longer supported; convert it again")
        raise AlignezError(
            f"{path} has GGUF version {version}; this reader supports versions 2 and 3: "
            "upgrade alignez-local or check the file"
        )
    n_tensors = p.u64()
    n_kv = p.u64()
    if n_tensors > MAX_TENSORS:
        raise AlignezError(
            f"{path} is corrupt: it claims {n_tensors} tensors (limit {MAX_TENSORS}); download it again"
        )
    if n_kv > MAX_KV:
        raise AlignezError(
            f"{path} is corrupt: it claims {n_kv} metadata keys (limit {MAX_KV}); download it again"
        )
    return version, n_tensors, n_kv


def _read_key_values(p: _Parser, n_kv: int) -> tuple[dict[str, Any], dict[str, ValueType]]:
    """Return (metadata, value types) of the ``n_kv`` key/value pairs; keys must be unique."""
    # Smallest possible key/value: 8-byte key length + 4-byte type + 1-byte value.
    p.need(13 * n_kv)
    metadata: dict[str, Any] = {}
    value_types: dict[str, ValueType] = {}
    for _ in range(n_kv):
        key = p.string("a metadata key")
        if key in metadata:
            raise AlignezError(f"{p.path} is corrupt: metadata key {_q(key)} appears twice; download it again")
        metadata[key], value_types[key] = p.value(key, p.value_type(key))
    return metadata, value_types


def _alignment(metadata: dict[str, Any], value_types: dict[str, ValueType], path: Path) -> int:
    """Return the data alignment: ``general.alignment`` when present (checked as ggml does), else 32."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    vt = value_types["general.alignment"]
    # ggml requires exactly a uint32 power of two here.
    if vt.kind != GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
        raise AlignezError(
            f"{path} is corrupt: general.alignment is {value!r} ({vt}), not a power of two; download it again"
        )
    if value > MAX_ALIGNMENT:
        raise AlignezError(f"{path} is corrupt: general.alignment {value} is implausibly large")
    return int(value)


def _read_tensor_infos(p: _Parser, n_tensors: int) -> list[_TensorInfo]:
    """Return the tensor table, each entry checked (name, dims, type, block size) as ggml does."""
    # Smallest possible tensor info: 8-byte name length + 4 (n_dims) + 4 (type) + 8 (offset).
    p.need(24 * n_tensors)
    infos: list[_TensorInfo] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        info = _read_tensor_info(p)
        if info.name in names:
            raise AlignezError(f"{p.path} is corrupt: tensor {_q(info.name)} appears twice; download it again")
        names.add(info.name)
        infos.append(info)
    return infos


def _read_tensor_info(p: _Parser) -> _TensorInfo:
    """Return one tensor table entry."""
    path = p.path
    name = p.string("a tensor name")
    if len(name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
        raise AlignezError(f"{path} is corrupt: tensor name {_q(name)} is longer than {MAX_TENSOR_NAME_BYTES} bytes")
    n_dims = p.u32()
    if n_dims > MAX_TENSOR_DIMS:
        raise AlignezError(f"{path} is corrupt: tensor {_q(name)} has {n_dims} dimensions (at most {MAX_TENSOR_DIMS})")
    ne = tuple(p.u64() for _ in range(n_dims))
    n_elements = 1
    for d in ne:
        n_elements *= d
        # ggml keeps element counts in int64; anything larger is a forged header.
        if n_elements > _INT64_MAX:
            raise AlignezError(f"{path} is corrupt: tensor {_q(name)} has shape {ne}; download it again")
    code = p.u32()
    if code not in GGML_QUANT_SIZES:
        raise AlignezError(
            f"{path} is corrupt or too new: tensor {_q(name)} has unknown type {code}; "
            "check the file or upgrade alignez-local"
        )
    ttype = GGMLQuantizationType(code)
    block, type_size = GGML_QUANT_SIZES[ttype]
    row = ne[0] if ne else 1
    if row % block:
        raise AlignezError(
            f"{path} is corrupt: tensor {_q(name)} has a row of {row} values, "
            f"not a multiple of the {ttype.name} block size {block}"
        )
    return _TensorInfo(name, ne, ttype, p.u64(), n_elements // block * type_size)


def _check_data_layout(infos: list[_TensorInfo], data_offset: int, alignment: int, size: int, path: Path) -> None:
    """Return nothing when the tensors are packed in order, each padded, and all inside the file."""
    expected = 0
    for info in infos:
        # ggml requires tensors packed in order, each padded to the alignment: check the same.
        if info.offset != expected:
            raise AlignezError(
                f"{path} is corrupt: tensor {_q(info.name)} has data offset {info.offset}, expected {expected}; "
                "download it again"
            )
        end = data_offset + info.offset + info.nbytes
        if end > size:
            raise AlignezError(f"{path} is truncated ({size} bytes, tensor data needs {end}); download it again")
        expected = _pad(info.offset + info.nbytes, alignment)


def _load_tensors(
    buf: Any, infos: list[_TensorInfo], data_offset: int, path: Path, *, want_data: bool, max_data_bytes: int
) -> dict[str, GGUFTensor]:
    """Return the tensors, with a read-only copy of the data of F32 ones when ``want_data``."""
    f32 = GGMLQuantizationType.F32
    if want_data:
        f32_bytes = sum(info.nbytes for info in infos if info.ttype == f32)
        if f32_bytes > max_data_bytes:
            raise AlignezError(
                f"{path} holds {f32_bytes >> 20} MiB of F32 tensors, more than this reader loads "
                f"({max_data_bytes >> 20} MiB); is it the right file?"
            )
    tensors: dict[str, GGUFTensor] = {}
    for info in infos:
        shape = tuple(int(d) for d in reversed(info.ne))
        data: np.ndarray | None = None
        if want_data and info.ttype == f32:
            start = data_offset + info.offset
            # bytes() copies out of the map; the array owns plain memory and the map can close.
            raw = bytes(buf[start : start + info.nbytes])
            data = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
            data.setflags(write=False)
        tensors[info.name] = GGUFTensor(shape, info.ttype.name, data)
    return tensors


def read_gguf(
    path: str | os.PathLike[str],
    want_data: bool = True,
    *,
    want_arrays: bool = True,
    what: str = "a .gguf file",
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
) -> GGUFContents:
    """Return the metadata and tensors of a GGUF file, validated; raise AlignezError on any problem.

    ``want_data`` loads the data of F32 tensors (other types always give ``data=None``), refusing
    more than ``max_data_bytes`` in total. ``want_arrays=False`` walks metadata arrays without
    loading them (they appear as ``GGUFArraySummary``), which is all identification needs.
    ``what`` names the expected file in the bad-magic message ("a .gguf control vector").
    """
    p = Path(path)
    _open_checked(p)
    try:
        fh = open(p, "rb")
    except PermissionError:
        raise AlignezError(f"cannot read {p}: permission denied; check the file's permissions") from None
    except OSError as err:
        raise AlignezError(f"cannot read {p}: {err.strerror or err}") from None
    with fh:
        # Use the size of the file we actually opened (it may have changed since the stat).
        size = os.fstat(fh.fileno()).st_size
        mm: mmap.mmap | None = None
        buf: Any
        if size == 0:
            buf = b""
        else:
            try:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                buf = mm
            except (OSError, ValueError):
                if size > _MAX_UNMAPPED_READ:
                    raise AlignezError(f"cannot map {p} into memory; copy it to a local disk and retry") from None
                try:
                    buf = fh.read()
                except OSError as err:
                    raise AlignezError(f"cannot read {p}: {err.strerror or err}") from None
                size = len(buf)
        try:
            return _parse(
                buf, size, p, want_data=want_data, want_arrays=want_arrays, what=what, max_data_bytes=max_data_bytes
            )
        except AlignezError:
            raise
        except (struct.error, ValueError, OverflowError, IndexError, KeyError, UnicodeError, MemoryError) as err:
            if _RAISE_INTERNAL_ERRORS:
                raise
            # Last line of defence: a file that trips an unforeseen path is still one clear line.
            raise AlignezError(
                f"{p} could not be parsed as GGUF ({type(err).__name__}); download it again"
            ) from None
        except OSError as err:
            raise AlignezError(f"cannot read {p}: {err.strerror or err}") from None
        finally:
            if mm is not None:
                mm.close()

