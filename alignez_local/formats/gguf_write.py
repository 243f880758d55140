"""Writing GGUF files atomically (a temp file beside the target, then a rename), with gguf's GGUFWriter."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from alignez_local.errors import AlignezError
from alignez_local.fileio import check_writable, make_temp_beside


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    kvs: Iterable[tuple[str, GGUFValueType, Any]],
    tensors: Sequence[tuple[str, np.ndarray]],
) -> Path:
    """Return the written path after writing a GGUF file atomically (temp file beside it, then rename).

    ``kvs`` are (key, value type, value) triples added after ``general.architecture``; tensors are
    written in the given order as contiguous little-endian arrays.
    """
    target = check_writable(path)
    fd, tmp_name = make_temp_beside(target)
    os.close(fd)
    tmp = Path(tmp_name)
    writer: GGUFWriter | None = None
    try:
        writer = GGUFWriter(tmp, arch)
        for key, vtype, value in kvs:
            writer.add_key_value(key, value, vtype)
        for name, array in tensors:
            arr = np.ascontiguousarray(array)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        writer = None
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        _cleanup(writer, tmp)
        raise AlignezError(f"cannot write {target}: {err.strerror or err}; check the disk and folder") from None
    except BaseException:
        _cleanup(writer, tmp)
        raise
    return target


def _cleanup(writer: GGUFWriter | None, tmp: Path) -> None:
    """Close a half-used writer and remove its temp file (best effort)."""
    if writer is not None:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - cleanup must not mask the original error
            pass
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass

