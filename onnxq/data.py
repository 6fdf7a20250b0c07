"""Calibration and evaluation data: where it comes from and how it reaches the model.

A data source is one of
- an ``.npz`` file: one array per model input, the leading axis indexing samples;
- a directory of such ``.npz`` files, read in name order;
- ``module:function`` (or ``path/to/file.py:function``): the function returns an iterable of
  feed dicts ``{input name: array}``, each fed to the model as it is.

Arrays are read one sample at a time and never all kept (``.npz`` members are memory-mapped when
uncompressed). Each feed is checked against the model's inputs: names, dtypes, static dimensions,
and, for calibration, finite values.

For an array source, a sample is ``arr[i:i+1]`` when the array has the model input's rank (the
leading axis is the batch axis) and ``arr[i]`` when it has one more dimension than the input.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxq.errors import DataError

Feed = dict[str, np.ndarray]
InputSpec = Mapping[str, tuple[type, list]]


# What numpy raises for a damaged archive or member: a bad zip, a bad header, a truncated or
# corrupt (compressed) member, an object array (which would need pickle).
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error)


def _load_npz(path: Path) -> Mapping[str, np.ndarray]:
    try:
        arrays = np.load(path, mmap_mode="r", allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive; write it with numpy.savez(path, input_name=array)")
    return arrays


def _mapped_member(arrays: np.lib.npyio.NpzFile, name: str, path: Path) -> np.ndarray | None:
    """An uncompressed (``numpy.savez``) member memory-mapped where it lies in the archive, so a
    sample reads its own bytes only (``np.load``'s mmap_mode does not apply to npz members: each
    ``data[name]`` would read the whole array again). None when the member cannot be mapped."""
    try:
        info = arrays.zip.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: its name and extra field lengths vary
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        size = int(np.prod(shape)) * dtype.itemsize
        if dtype.hasobject or size == 0 or offset + size > info.header_offset + 30 + name_len + extra_len + info.file_size:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")
    except (*_READ_ERRORS, struct.error):
        return None


def _member(arrays: Mapping[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    """Array ``name`` of an npz, with a one-line error for a corrupt or object-typed member."""
    mapped = _mapped_member(arrays, name, path)
    if mapped is not None:
        return mapped
    try:
        arr = arrays[name]
    except _READ_ERRORS as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: array {name!r} holds Python objects (an object array); save numeric arrays") from None
        raise DataError(f"{path}: array {name!r} cannot be read ({type(exc).__name__}: {exc}); write numeric arrays with numpy.savez") from None
    if arr.dtype.hasobject:
        raise DataError(f"{path}: array {name!r} holds Python objects; save numeric arrays")
    return arr


def _npz_samples(path: Path, spec: InputSpec) -> tuple[int, Callable[[], Iterator[Feed]]]:
    arrays = _load_npz(path)
    names = list(arrays.keys())
    missing = [n for n in spec if n not in names]
    extra = [n for n in names if n not in spec]
    if missing or extra:
        raise DataError(
            f"{path}: arrays {names} do not match the model inputs {list(spec)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
            + "; save one array per model input, named like the input"
        )
    counts = {}
    per_sample_rank = {}
    for name, (_, shape) in spec.items():
        arr = _member(arrays, name, path)
        if arr.ndim == 0:
            raise DataError(f"{path}: array {name!r} is a single value (0-d); give [samples, ...input dims], e.g. one value per sample")
        if shape is None or arr.ndim == len(shape):
            # leading axis is the batch axis: feed arr[i:i+1] (also for an input of unknown rank)
            per_sample_rank[name] = False
        elif arr.ndim == len(shape) + 1:
            per_sample_rank[name] = True  # one extra leading axis: feed arr[i]
        else:
            raise DataError(
                f"{path}: array {name!r} has shape {list(arr.shape)} but the model input has rank "
                f"{len(shape)}; give [samples, ...input dims] (or [samples, ...] with batch 1)"
            )
        counts[name] = arr.shape[0]
    if len(set(counts.values())) > 1:
        raise DataError(f"{path}: arrays have different sample counts {counts}; give every input the same number")
    n = next(iter(counts.values())) if counts else 0

    def gen() -> Iterator[Feed]:
        data = _load_npz(path)
        members = {name: _member(data, name, path) for name in spec}
        for i in range(n):
            try:
                yield {
                    name: np.array(arr[i] if per_sample_rank[name] else arr[i : i + 1])
                    for name, arr in members.items()
                }
            except _READ_ERRORS as exc:
                raise DataError(f"{path}, sample {i}: cannot be read ({type(exc).__name__}: {exc})") from None

    return n, gen


def _import_callable(ref: str, what: str = "data source", error: type[Exception] = DataError) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` → the callable; ``error`` says ``what`` failed."""
    mod_name, _, func_name = ref.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {mod_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except Exception as exc:
        raise error(f"{what} {ref!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise error(f"{what} {ref!r}: {mod_name} has no function {func_name!r}")
    return func


@dataclass
class DataSource:
    """A re-iterable source of validated feed dicts for one model."""

    description: str
    length: int | None
    _factory: Callable[[], Iterator[Feed]]
    spec: InputSpec
    require_finite: bool = True
    # samples per ORT call when calibrating on this source (None: chosen from memory; 1: one at a time)
    batch: int | None = None

    def __len__(self) -> int:
        return self.length or 0

    def __iter__(self) -> Iterator[Feed]:
        from onnxq.runtime.ort import validate_feed

        count = 0
        for i, raw in enumerate(self._guarded()):
            if not isinstance(raw, Mapping):
                raise DataError(
                    f"{self.description}: item {i} is a {type(raw).__name__}, expected a dict of "
                    "{input name: array}"
                )
            feed = validate_feed(raw, self.spec, f"{self.description}, sample {i}")
            if self.require_finite:
                for name, arr in feed.items():
                    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                        bad = "NaN" if np.isnan(arr).any() else "Inf"
                        raise DataError(
                            f"{self.description}, sample {i}: input {name!r} contains {bad}; "
                            "calibration data must be finite — clean or drop that sample"
                        )
            count += 1
            yield feed
        if count == 0:
            raise DataError(f"{self.description} holds no samples; give at least one")


    def _guarded(self) -> Iterator[object]:
        """The factory's items; an exception raised by user code while producing one becomes a
        one-line DataError naming the source and the sample."""
        items = self._factory()
        i = 0
        while True:
            try:
                raw = next(items)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"{self.description}, sample {i}: the data source raised {type(exc).__name__}: {exc}") from None
            yield raw
            i += 1


def open_source(
    source: str | os.PathLike | Iterable[Mapping[str, np.ndarray]], spec: InputSpec, *, limit: int | None = None, require_finite: bool = True, batch: int | None = None
) -> DataSource:
    """Resolve a data source (see module docstring) against a model's input spec; ``batch``: the
    samples per ORT call calibration uses on it (:mod:`onnxq.calibrators.batching`)."""
    return dataclasses.replace(_open(source, spec, limit=limit, require_finite=require_finite), batch=batch)


def _open(source: str | os.PathLike | Iterable[Mapping[str, np.ndarray]], spec: InputSpec, *, limit: int | None, require_finite: bool) -> DataSource:
    if not isinstance(source, (str, os.PathLike)):
        items = source

        def from_iterable() -> Iterator[Feed]:
            return iter(items)

        length = len(items) if hasattr(items, "__len__") else None
        return _limited(DataSource("data", length, from_iterable, spec, require_finite), limit)

    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise DataError(f"{path} holds no .npz files; put one .npz per batch of samples there")
        parts = [_npz_samples(f, spec) for f in files]

        def from_dir() -> Iterator[Feed]:
            for _, gen in parts:
                yield from gen()

        return _limited(DataSource(str(path), sum(n for n, _ in parts), from_dir, spec, require_finite), limit)
    if path.suffix == ".npz" or path.exists():
        if not path.exists():
            raise DataError(f"{path}: no such file; give an .npz, a directory of .npz, or module:function")
        n, gen = _npz_samples(path, spec)
        return _limited(DataSource(str(path), n, gen, spec, require_finite), limit)
    if ":" in text:
        func = _import_callable(text)

        def from_func() -> Iterator[Feed]:
            try:
                result = func()
            except Exception as exc:
                raise DataError(f"data source {text!r} raised {type(exc).__name__}: {exc}") from None
            if isinstance(result, (Mapping, str, bytes)) or not isinstance(result, Iterable):
                raise DataError(f"data source {text!r} returned a {type(result).__name__}; return an iterable (list or generator) of {{input name: array}} dicts")
            return iter(result)

        return _limited(DataSource(text, None, from_func, spec, require_finite), limit)
    raise DataError(f"{text}: no such file; give an .npz, a directory of .npz, or module:function")


def _limited(src: DataSource, limit: int | None) -> DataSource:
    if limit is None:
        return src
    if limit <= 0:
        raise DataError(f"a sample limit must be positive, got {limit}")
    inner = src._factory

    def capped() -> Iterator[Feed]:
        for i, feed in enumerate(inner()):
            if i >= limit:
                return
            yield feed

    length = min(src.length, limit) if src.length is not None else limit
    return DataSource(src.description, length, capped, src.spec, src.require_finite)
