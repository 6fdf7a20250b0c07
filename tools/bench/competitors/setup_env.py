"""Create the venv the competitor runners use (ModelOpt's ONNX PTQ, ORT, INC), apart from onnxq's.

    python tools/bench/competitors/setup_env.py [--venv DIR] [--only modelopt|inc ...] [--recreate]

Default venv: $ONNXQ_BENCH_VENV or ~/.cache/onnxq/bench-venv. Competitors never go into the
project venv: their pins (onnx, onnxruntime) differ from onnxq's, and their declared dependencies
pull CUDA wheels a CPU-only machine cannot use.

Why each list is what it is:
- torch==2.13.0 first: the CPU wheel the project pins; an unpinned torch pulls GB of CUDA.
- nvidia-modelopt is installed --no-deps: its [onnx] extra asks for onnxruntime-gpu and
  cupy-cuda12x on Linux x86. MODELOPT_DEPS is its core + [onnx] requirement list with the CPU
  onnxruntime instead of onnxruntime-gpu and without cupy (only the INT4 path imports cupy, and it
  falls back to numpy without it).
- INC: onnx-neural-compressor, Intel Neural Compressor's ONNX Runtime package (its SmoothQuant
  works on the ONNX graph), installed --no-deps with the light dependencies it imports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TORCH = "torch==2.13.0"

MODELOPT = "nvidia-modelopt==0.47.0"
MODELOPT_DEPS = [
    # core requirements of nvidia-modelopt 0.47.0 (torch pinned above)
    "ninja", "numpy", "nvidia-ml-py>=12", "packaging", "setuptools>=80", "tqdm", "PyYAML>=6.0",
    "omegaconf>=2.3.0", "pulp<4.0", "pydantic>=2.0", "regex", "rich", "safetensors", "scipy",
    # its [onnx] extra, minus onnxruntime-gpu (-> onnxruntime) and cupy-cuda12x
    "cppimport", "lief", "ml_dtypes", "onnx-graphsurgeon>=0.6.1", "onnx~=1.21.0",
    "onnxconverter-common~=1.16.0", "onnxruntime~=1.24.2", "onnxscript", "onnxslim>=0.1.76",
    "polygraphy>=0.53.4",
]

INC = "onnx-neural-compressor==1.0"
# onnx/onnxruntime as ModelOpt pins them (INC 1.0 runs on them); its numpy<2 pin is not needed for
# the static/SmoothQuant path, and onnxruntime-extensions is imported only on Python < 3.11
INC_DEPS = ["onnx~=1.21.0", "onnxruntime~=1.24.2", "numpy", "psutil", "py-cpuinfo", "pydantic", "transformers", "prettytable"]

GROUPS = {"modelopt": ([TORCH], [MODELOPT], MODELOPT_DEPS), "inc": ([], [INC], INC_DEPS)}


def default_venv() -> Path:
    return Path(os.environ.get("ONNXQ_BENCH_VENV") or Path.home() / ".cache" / "onnxq" / "bench-venv")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=default_venv(), help="where to create the venv (default: %(default)s)")
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS), help="which competitors to install")
    ap.add_argument("--recreate", action="store_true", help="delete the venv first")
    args = ap.parse_args(argv)

    venv = args.venv.expanduser()
    if args.recreate and venv.exists():
        shutil.rmtree(venv)
    if not venv_python(venv).exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv_python(venv)
    start = time.perf_counter()
    for name in (g for g in GROUPS if g in args.only):  # modelopt first: it pins torch
        first, no_deps, deps = GROUPS[name]
        if first:
            pip(python, *first)
        pip(python, "--no-deps", *no_deps)
        # the pins above stay: torch must not be upgraded to a CUDA build by a later resolve
        pip(python, *deps, *first)
    print(f"competitor venv ready in {time.perf_counter() - start:.0f}s: {venv}")
    print(f"use it with: ONNXQ_BENCH_VENV={venv} (the default needs nothing)" if venv != default_venv() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
