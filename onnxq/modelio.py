"""Load and save ONNX models through onnx_ir, atomically and with external data when large.

Inputs are never modified: loading reads the file (external weights lazily, read from their side
file on each use), and saving refuses to write over the input.
Outputs are first written beside their destination and then renamed into place, so an interrupted
run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.errors import ModelLoadError, OutputPathError, one_line

# Protobuf cannot serialize a message of 2 GiB or more; above this, weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 1 << 30

# ONNX Runtime refuses models whose IR version is newer than it knows; onnx's newest helpers
# write such versions by default. The IR version a model needs follows from its opsets.
_IR_FOR_OPSET = {opset: ir_v for _, ir_v, opset, *_ in onnx.helper.VERSION_TABLE}


def required_ir_version(model: ir.Model) -> int:
    """The smallest IR version that can carry the model's default-domain opset."""
    opset = model.opset_imports.get("", 1)
    known = [o for o in _IR_FOR_OPSET if o >= opset]
    if not known:
        return max(_IR_FOR_OPSET.values())
    return _IR_FOR_OPSET[min(known)]


def load(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model, with a clear error for a missing, truncated or non-ONNX file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; pass the path of an .onnx model")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the path of an .onnx model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty; re-export or re-copy the model")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "check that the file is complete and really is ONNX"
        ) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelLoadError(f"{path} holds no graph; it is probably not an ONNX model")
    # External weights stay on disk, read each time they are used and never kept mapped (a
    # 2.8B decoder's 11 GB would otherwise become resident): a missing or short side file fails
    # here, reads do not depend on the working directory, and no output or session ever
    # references the input's data file (tensors are serialized from their bytes).
    _make_external_lazy(model, path)
    _check_weights(model, path)
    return model


def _make_external_lazy(model: ir.Model, path: Path) -> None:
    """Replace every external initializer by a tensor read from its file on each use."""
    for graph in model.graphs():
        for name, init in graph.initializers.items():
            tensor = init.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            source, folder = Path(tensor.path).resolve(), Path(tensor.base_dir or ".").resolve()
            if folder not in source.parents:  # as onnx_ir's own reads require: no file outside the model's folder
                raise ModelLoadError(f"{path}: the external weight data of {name!r} is outside the model's folder ({tensor.location}); keep the data file next to the model")
            offset, length = tensor.offset or 0, tensor.length if tensor.length is not None else tensor.nbytes
            size = source.stat().st_size if source.is_file() else -1
            if size < 0 or size < offset + length:
                found = "is missing" if size < 0 else f"holds {size} bytes, not the {offset + length} it needs"
                raise ModelLoadError(f"{path}: the external weight data of {name!r} cannot be read ({source} {found}); keep the data file next to the model")
            read = functools.partial(_read_external, source, offset, length, tensor.dtype, tensor.shape)
            init.const_value = ir.LazyTensor(read, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)


def _read_external(source: Path, offset: int, length: int, dtype: ir.DataType, shape: ir.Shape) -> ir.Tensor:
    """The tensor's bytes read from ``source`` into memory of its own (no mapping stays open)."""
    if dtype.bitwidth >= 8 and dtype != ir.DataType.STRING:
        array = np.fromfile(source, dtype=np.dtype(dtype.numpy()).newbyteorder("<"), count=int(np.prod(shape.numpy())), offset=offset)
        return ir.Tensor(array.reshape(shape.numpy()), dtype=dtype)
    mapped = ir.ExternalTensor(source.name, offset, length, dtype, shape=shape, name="", base_dir=source.parent)  # packed 2/4/6-bit types
    try:
        return ir.Tensor(np.array(mapped.numpy()), dtype=dtype)
    finally:
        mapped.release()


def checker_reason(path: str | os.PathLike) -> str | None:
    """Why the model file at ``path`` fails onnx.checker (whole, on one line), or None if it passes
    (or cannot be checked by path). Asked when onnxq's output fails the checker: an invalid input
    is the input's problem, not onnxq's."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        return one_line(exc)
    except Exception:  # noqa: BLE001 - unreadable here: no verdict on the input
        return None
    return None


def _check_weights(model: ir.Model, path: Path) -> None:
    """Every initializer holds the bytes its shape and type need (a damaged file may not)."""
    for name, init in model.graph.initializers.items():
        if init.const_value is None or isinstance(init.const_value, ir.LazyTensor):
            continue  # lazy: an external tensor whose file size was checked (reading it all would defeat it)
        try:
            init.const_value.numpy()
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: initializer {name!r} does not hold the data its shape {init.const_value.shape} "
                f"and type {init.const_value.dtype} need ({exc}); the file is damaged: re-export it"
            ) from None


# Temporary names: ``.<dest name>.tmp<pid>.<random>``; the pid lets a later run remove the
# leftovers of a killed one (SIGKILL runs no cleanup).
_TMP_TAG = ".tmp"
# A temporary name is the destination's name plus this many characters at most.
_TMP_EXTRA = 32


def _as_input_paths(inputs: Iterable[object]) -> list[Path]:
    """The files and folders among a command's inputs: paths, ``file.py:function`` specs'
    files, and each ONNX model's external-data files. Objects (data iterables, plans) are skipped."""
    found: list[Path] = []
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)):
            continue
        path = Path(given)
        text = os.fspath(given)
        if not path.exists() and ":" in text:
            path = Path(text.rpartition(":")[0])  # module:function or file.py:function
        if not path.exists():
            continue
        found.append(path)
        if path.is_file() and path.suffix == ".onnx":
            found.extend(external_data_files(path))
    return found


def external_data_files(path: Path) -> list[Path]:
    """The side files an ONNX model's initializers point to (none for a self-contained model)."""
    stat = path.stat()
    return list(_external_data_files(path.resolve(), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)  # a command checks its outputs more than once; parse the model once
def _external_data_files(path: Path, _mtime_ns: int, _size: int) -> tuple[Path, ...]:
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # not readable: loading it reports the problem
        return ()
    files = set()
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location:
                files.add(path.parent / location)
    return tuple(sorted(files))


def _input_kind(path: Path) -> str:
    kinds = {".onnx": "the input model", ".data": "the input model's external data", ".npz": "the input data"}
    return kinds.get(path.suffix, "the input file")


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_writable(out: Path) -> None:
    """A one-line error now for a path the final rename could not create."""
    if out.is_dir():
        raise OutputPathError(f"output {out} is a directory; give a file path")
    parent = out.parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OutputPathError(f"output {out} goes through {folder}, which is a file, not a directory")
            break
    if not parent.exists():
        raise OutputPathError(f"output directory {parent} does not exist; create it first")
    name_max = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if len(out.name.encode()) + _TMP_EXTRA > name_max:
        raise OutputPathError(f"output file name {out.name[:40]}... is too long for {parent} (at most {name_max - _TMP_EXTRA} bytes); choose a shorter name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory {parent} is not writable; choose another output path")


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[object] = ()) -> list[Path]:
    """Refuse, before any work, outputs that would overwrite an input (a model and its external
    data, data files and folders, plans, tables, sweeps, recipes), that collide with each other,
    or that cannot be written. ``None`` entries are skipped. An ``.onnx`` output's ``.data`` side
    file (written when the model is large) counts as an output too."""
    outs = [Path(o) for o in outputs if o is not None]
    running = _CURRENT.get()
    ins = _as_input_paths([*inputs, *(running.inputs if running is not None else ())])
    for i, out in enumerate(outs):
        _check_writable(out)
        for other in outs[:i]:
            if _same(out, other):
                raise OutputPathError(f"outputs {other} and {out} are the same file; give each output its own path")
        side = [out, Path(f"{out}.data")] if out.suffix == ".onnx" else [out]
        for written in side:
            for src in ins:
                if _same(written, src):
                    raise OutputPathError(f"output {written} is {_input_kind(src)} {src}; choose another output path (inputs are never overwritten)")
                if src.is_dir() and written.suffix == ".npz" and src.resolve() in written.resolve().parents:
                    raise OutputPathError(f"output {written} is inside the data folder {src}, whose .npz files are inputs; choose another output path")
    return outs


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale_temporaries(dest: Path) -> None:
    """Temporaries of ``dest`` left by runs that were killed (their pid is gone)."""
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}{_TMP_TAG}*"):
        pid = leftover.name[len(dest.name) + 1 + len(_TMP_TAG):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(leftover)


class Transaction:
    """The outputs of one command: written to temporaries beside their destinations, renamed
    into place together by :meth:`commit`, all removed by :meth:`rollback`.

    Each destination is locked (``.<name>.lock`` beside it, holding the pid) for the whole
    command, so a second process writing the same output is refused before it starts instead of
    interleaving its model, plan and report with ours; a lock whose process is gone is taken over.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # destination -> temporary, in commit order
        self._scratch: list[Path] = []  # temporary folders (external data), removed at the end
        self._locks: dict[Path, Path] = {}  # destination -> its lock file
        self.inputs: list[object] = []  # of the command and its parts: no output may be one

    def lock(self, dest: Path) -> None:
        key = dest.resolve()
        if key in self._locks:
            return
        lock = dest.parent / f".{dest.name}.lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock.read_text().strip() if lock.exists() else ""
                if owner.isdigit() and _pid_alive(int(owner)):
                    raise OutputPathError(f"another onnxq run (pid {owner}) is writing {dest}; wait for it or choose another output path") from None
                _remove(lock)  # left by a killed run
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locks[key] = lock
            _remove_stale_temporaries(dest)
            return
        raise OutputPathError(f"cannot lock {dest} ({lock} keeps reappearing); remove it if no onnxq run is writing {dest}")

    def temp_file(self, dest: Path, suffix: str = "") -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{_TMP_TAG}{os.getpid()}.", suffix=suffix or dest.suffix, dir=dest.parent)
        os.close(fd)
        # mkstemp creates 0600 files; outputs are ordinary artifacts, so honour the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        return Path(tmp)

    def temp_dir(self, dest: Path) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_TMP_TAG}{os.getpid()}.", dir=dest.parent))
        self._scratch.append(folder)
        return folder

    def stage(self, tmp: Path, dest: Path) -> None:
        """``tmp`` becomes ``dest`` at commit (a later version of the same destination wins)."""
        earlier = self._staged.pop(dest, None)
        if earlier is not None and earlier != tmp:
            _remove(earlier)
        self._staged[dest] = tmp

    def commit(self) -> None:
        """Rename every staged file into place, with SIGINT/SIGTERM held off for the renames."""
        with _signals_deferred():
            try:
                while self._staged:
                    dest, tmp = next(iter(self._staged.items()))
                    os.replace(tmp, dest)
                    del self._staged[dest]
            except OSError as exc:
                raise OutputPathError(f"cannot write {dest} ({exc.strerror or exc})") from None
            finally:
                self.rollback()

    def rollback(self) -> None:
        for tmp in [*self._staged.values(), *self._scratch]:
            _remove(tmp)
        self._staged.clear()
        self._scratch.clear()

    def release(self) -> None:
        for lock in self._locks.values():
            _remove(lock)
        self._locks.clear()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the body runs (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_CURRENT: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("onnxq_transaction", default=None)


@contextlib.contextmanager
def transaction(outputs: Iterable[str | os.PathLike | None] = (), inputs: Iterable[object] = ()) -> Iterator[Transaction]:
    """Run a command's body with its outputs as one transaction.

    ``outputs`` are checked against ``inputs`` (and those of enclosing transactions) and each
    other (:func:`check_outputs`), and locked.
    Every file written through :func:`atomic_path` or :func:`save` inside the body is staged and
    renamed into place only when the outermost transaction ends without an exception; on any
    exception (KeyboardInterrupt included) nothing is renamed and every temporary is removed.
    Nested transactions join the outermost one.
    """
    inputs = list(inputs)
    outs = check_outputs(outputs, inputs)
    outer = _CURRENT.get()
    txn = outer if outer is not None else Transaction()
    token = _CURRENT.set(txn) if outer is None else None
    txn.inputs.extend(inputs)
    try:
        for out in outs:
            txn.lock(out)
        yield txn
        if outer is None:
            txn.commit()
    except BaseException:
        if outer is None:
            txn.rollback()
        raise
    finally:
        if outer is None:
            _CURRENT.reset(token)
            txn.release()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; it becomes ``dest`` when the surrounding
    :func:`transaction` commits (at once without one), and is removed on any failure."""
    dest = Path(dest)
    with transaction() as txn:
        tmp = txn.temp_file(dest, suffix)
        try:
            yield tmp
        except BaseException:
            _remove(tmp)
            raise
        txn.stage(tmp, dest)


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically, with ORT-compatible IR version.

    Models whose weights exceed :data:`EXTERNAL_DATA_THRESHOLD` get their initializers in
    ``<name>.data`` beside the model (also written atomically).
    """
    path = Path(path)
    model.ir_version = required_ir_version(model)
    weight_bytes = sum(
        init.const_value.nbytes
        for init in model.graph.initializers.values()
        if init.const_value is not None
    )
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        with atomic_path(path) as tmp:
            _save_inline(model, tmp)
        return path
    data_name = path.name + ".data"
    # ir.save writes the side file relative to the model path: both go to a temporary folder
    # and are staged as a pair (the data first, so the model never points at a missing file).
    with transaction() as txn:
        tmpdir = txn.temp_dir(path)
        ir.save(model, tmpdir / path.name, external_data=data_name)
        txn.stage(tmpdir / data_name, path.parent / data_name)
        txn.stage(tmpdir / path.name, path)
    return path


# Protobuf field numbers: ModelProto.graph, GraphProto.initializer.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_PLACEHOLDER = ir.Tensor(np.zeros(0, dtype=np.uint8))


def _save_inline(model: ir.Model, path: Path) -> None:
    """The bytes ``ir.save(model, path)`` writes, without a proto or a serialized copy of all the
    weights in memory (0.5B decoder: +1.8 GB RSS): the model is serialized with placeholders for
    the main graph's initializers, and each initializer is serialized and written on its own
    where protobuf puts it (fields in field-number order, as upb and C++ protobuf write them)."""
    graph = model.graph
    tensors = {name: v.const_value for name, v in graph.initializers.items() if v.const_value is not None}
    try:
        for name in tensors:
            graph.initializers[name].const_value = _PLACEHOLDER
        skeleton = ir.to_proto(model)
    finally:
        for name, tensor in tensors.items():
            graph.initializers[name].const_value = tensor
    del skeleton.graph.initializer[:]
    graph_bytes = skeleton.graph.SerializeToString()
    skeleton.ClearField("graph")
    model_bytes = skeleton.SerializeToString()
    sizes = []
    for name, tensor in tensors.items():
        tensor.name = name  # as ir.save does: the tensor carries its value's name
        sizes.append(ir.serde.serialize_tensor(tensor).ByteSize())
    graph_size = len(graph_bytes) + sum(len(_key(_GRAPH_INITIALIZER, n)) + n for n in sizes)
    model_split, graph_split = _split_before(model_bytes, _MODEL_GRAPH), _split_before(graph_bytes, _GRAPH_INITIALIZER + 1)
    with open(path, "wb") as f:
        f.write(model_bytes[:model_split] + _key(_MODEL_GRAPH, graph_size) + graph_bytes[:graph_split])
        for tensor in tensors.values():
            data = ir.serde.serialize_tensor(tensor).SerializeToString()
            f.write(_key(_GRAPH_INITIALIZER, len(data)))
            f.write(data)
            del data
        f.write(graph_bytes[graph_split:] + model_bytes[model_split:])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, length: int) -> bytes:
    """The tag and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(length)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def _split_before(message: bytes, field: int) -> int:
    """The offset of the first field numbered ``field`` or above in a serialized message."""
    i = 0
    while i < len(message):
        key, j = _read_varint(message, i)
        if key >> 3 >= field:
            return i
        wire = key & 7
        if wire == 0:
            _, j = _read_varint(message, j)
        elif wire == 2:
            length, j = _read_varint(message, j)
            j += length
        else:
            j += {1: 8, 5: 4}[wire]
        i = j
    return i


def save_with_external_data(model: ir.Model, path: str | os.PathLike) -> str:
    """``model`` written to ``path`` (not atomically: a scratch copy to read back) at its
    ORT-compatible IR version, every initializer in ``<name>.data`` beside it, written tensor by
    tensor; ``model`` is left as it was. Returns the path."""
    path = os.fspath(path)
    saved_version = model.ir_version
    model.ir_version = required_ir_version(model)
    try:
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
    finally:
        model.ir_version = saved_version
    return path


def release_detached_values(model: ir.Model) -> None:
    """Forget values that left the graphs' inputs or outputs. onnx_ir 1.1's input/output lists
    keep a reference count per value that ever was an input or output and never drop an entry at
    zero, so a removed initializer that had been a graph input (every initializer of some
    exporters) keeps its tensor alive: quantization then held the float weights next to the
    quantized ones (0.5B decoder: 1.5 GB)."""
    for graph in model.graphs():
        for io in (graph.inputs, graph.outputs):
            counts = getattr(io, "_ref_counter", None)
            if counts is not None:
                for value in [v for v, n in counts.items() if n <= 0]:
                    del counts[value]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto with ORT-compatible IR version (for in-memory sessions and checks)."""
    proto = ir.to_proto(model)
    proto.ir_version = required_ir_version(model)
    return proto
