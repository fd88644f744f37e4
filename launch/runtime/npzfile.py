"""Uncompressed `.npz` files (np.savez's layout: one zip member `<name>.npy` per array) written and read in
pieces: a streamed writer for a large array, the headers of every member, and a member's data offset for a
memory map. Nothing here holds a whole array in memory."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

from launch.runtime.files import FileWriteError, os_reason, temp_path

NPY_SUFFIX = ".npy"
ZIP_LOCAL_HEADER_SIZE = 30  # a zip local file header: 30 bytes, then the file name and the extra field
NAME_LENGTH_AT, EXTRA_LENGTH_AT = 26, 28  # byte offsets of those two lengths inside the local header

Header = tuple[tuple[int, ...], np.dtype, bool]  # shape, dtype, Fortran order


def read_header(f: object) -> tuple[Header, int]:
    """The .npy header at the start of the open member `f`: ((shape, dtype, fortran), header length)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return (tuple(shape), np.dtype(dtype), bool(fortran)), f.tell()


def read_headers(path: Path) -> dict[str, Header]:
    """Shape, dtype and order of every array of an .npz, from the headers only (no data read)."""
    out: dict[str, Header] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.endswith(NPY_SUFFIX):
                with z.open(info) as f:
                    out[info.filename[: -len(NPY_SUFFIX)]] = read_header(f)[0]
    return out


def member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where the bytes of an uncompressed member start in the file (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(ZIP_LOCAL_HEADER_SIZE)
    name_len = int.from_bytes(local[NAME_LENGTH_AT:NAME_LENGTH_AT + 2], "little")
    extra_len = int.from_bytes(local[EXTRA_LENGTH_AT:EXTRA_LENGTH_AT + 2], "little")
    return info.header_offset + ZIP_LOCAL_HEADER_SIZE + name_len + extra_len


class NpzWriter:
    """Stream chunks of one array `name` of shape [N, *row_shape] into a new `.npz`, then add small arrays.

    Writes to a temporary name beside `path` and renames it on `close`, so a killed writer never leaves a
    partial file under the final name; an OS error (full disk, file-size limit) is FileWriteError naming `path`.
    """

    def __init__(self, path: str | os.PathLike, name: str, num_rows: int, row_shape: tuple[int, ...],
                 dtype: np.dtype = np.dtype(np.uint8)):
        self.path = Path(path)
        self.num_rows, self.row_shape, self.dtype = num_rows, tuple(row_shape), np.dtype(dtype)
        self.written = 0
        self._tmp = temp_path(self.path)
        try:
            self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self._member = self._zip.open(name + NPY_SUFFIX, "w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (num_rows, *self.row_shape)}
            np.lib.format.write_array_header_2_0(self._member, header)
        except OSError as exc:
            self.abort()
            raise FileWriteError(f"cannot write {self.path}: {os_reason(exc)}") from None

    def write(self, chunk: np.ndarray) -> None:
        if chunk.dtype != self.dtype or chunk.shape[1:] != self.row_shape:
            raise ValueError(f"chunk of {chunk.dtype} {chunk.shape[1:]} does not fit {self.path}'s {self.dtype} "
                             f"{self.row_shape} rows")
        if self.written + len(chunk) > self.num_rows:
            raise ValueError(f"{self.path}: more than the {self.num_rows} rows announced")
        try:
            self._member.write(np.ascontiguousarray(chunk).data)
        except OSError as exc:
            self.abort()
            raise FileWriteError(f"cannot write {self.path}: {os_reason(exc)}") from None
        self.written += len(chunk)

    def close(self, extras: Mapping[str, np.ndarray] | None = None) -> Path:
        """Add `extras` (small arrays), then rename the finished file to `path`."""
        if self.written != self.num_rows:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} rows written but {self.num_rows} announced")
        try:
            self._member.close()
            for name, value in (extras or {}).items():
                with self._zip.open(name + NPY_SUFFIX, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
            self._zip.close()
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise FileWriteError(f"cannot write {self.path}: {os_reason(exc)}") from None
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (best effort)."""
        for closer in (getattr(self, "_member", None), getattr(self, "_zip", None)):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # noqa: BLE001 - cleanup of a temporary file that is deleted next
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
