"""onnxq export / onnxq.export: torch → ONNX with verification against torch in ORT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch; install onnxq[zoo] (torch==2.13.0 CPU)")

from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.export import ExportError, export, parse_dynamic, parse_input  # noqa: E402
from onnxq.runtime.ort import create_session  # noqa: E402

@pytest.fixture(scope="module")
def factories():
    return Path(__file__).parent / "torch_factories.py"


def _cli(*args):
    """The CLI in a fresh process (proves: no traceback, exit code)."""
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True)


def _main(capsys, *args):
    """The CLI in this process (torch already imported: fast); returns (exit code, stdout, stderr)."""
    from onnxq.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(12, 24)
        self.b = torch.nn.Linear(24, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_export_verifies_on_example_and_random_shapes(tmp_path):
    module = Mlp()
    x = torch.randn(3, 12)
    result = export(module, {"x": x}, tmp_path / "mlp.onnx", output_names=["y"], dynamic=["x:0:batch=1..64"], random_checks=3)
    check = result.verification
    assert check.passed and len(check.checks) == 4
    assert {c.feed.split(" (")[0] for c in check.checks} == {"example", "random #1", "random #2", "random #3"}
    assert all(c.cosine > 0.9999 and c.max_abs_error < 1e-4 for c in check.checks)
    # the batch axis really is dynamic: ORT runs batch 7 and matches torch
    session = create_session(tmp_path / "mlp.onnx")
    assert [o.name for o in session.get_outputs()] == ["y"]
    x7 = np.random.default_rng(1).standard_normal((7, 12)).astype(np.float32)
    (y,) = session.run(None, {"x": x7})
    np.testing.assert_allclose(y, module(torch.from_numpy(x7)).detach().numpy(), atol=1e-5)


def test_cli_export_with_dynamic_axis(tmp_path, factories, capsys):
    out = tmp_path / "tok.onnx"
    proc = _main(capsys, "export", f"{factories}:token_net", "-o", out, "--input", "ids:1x7:int64:0..50",
                "--input", "x:1x8:float32", "--dynamic", "ids:1:seq=2..64")
    assert proc.returncode == 0, proc.stderr
    assert "verified against torch" in proc.stdout and proc.stdout.count("cosine") == 3
    session = create_session(out)
    ids = np.arange(20, dtype=np.int64).reshape(1, 20)
    x = np.ones((1, 8), np.float32)
    assert session.run(None, {"ids": ids, "x": x})[0].shape == (1, 20, 8)


@pytest.mark.parametrize("factory, inputs, message", [
    ("broken", ["x:2x8:float32"], "factory .*broken' raised RuntimeError: checkpoint weights.pt not found"),
    ("not_a_module", ["x:2x8:float32"], "returned int, not a torch.nn.Module"),
    ("missing", ["x:2x8:float32"], "has no function .missing."),
    ("noisy", ["x:2x8:float32"], "differs from torch: output .* cosine .*--no-verify"),
    ("noisy", ["x:2y8:float32"], "shape '2y8' is not dims joined by 'x'"),
    ("noisy", ["x:2x8"], "does not parse; write NAME:SHAPE:DTYPE"),
    ("noisy", ["x:2x8:complex64"], "dtype 'complex64' is not one of"),
])
def test_bad_export_is_one_line_error(tmp_path, factories, factory, inputs, message, capsys):
    import re

    out = tmp_path / "m.onnx"
    args = [a for spec in inputs for a in ("--input", spec)]
    proc = _main(capsys, "export", f"{factories}:{factory}", "-o", out, *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


def test_no_verify_keeps_a_mismatching_export(tmp_path, factories, capsys):
    out = tmp_path / "noisy.onnx"
    proc = _main(capsys, "export", f"{factories}:noisy", "-o", out, "--input", "x:2x8:float32", "--no-verify")
    assert proc.returncode == 0 and out.exists() and "not verified" in proc.stdout


def test_failed_verification_in_a_fresh_process_exits_2_without_traceback(tmp_path, factories):
    proc = _cli("export", f"{factories}:noisy", "-o", tmp_path / "m.onnx", "--input", "x:2x8:float32")
    assert proc.returncode == 2 and proc.stderr.startswith("onnxq: error: export failed")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_tiny_tolerance_fails_verification(tmp_path):
    with pytest.raises(ExportError, match="differs from torch"):
        export(Mlp(), (torch.randn(2, 12),), tmp_path / "m.onnx", min_cosine=1.0 + 1e-9)
    assert not (tmp_path / "m.onnx").exists()


def test_spec_parsing():
    spec = parse_input("ids:1x128:int64:0..30522")
    assert (spec.name, spec.shape, spec.dtype, spec.low, spec.high) == ("ids", (1, 128), "int64", 0, 30522)
    dim = parse_dynamic("input_ids:1:seq=2..512")
    assert (dim.input, dim.axis, dim.name, dim.min, dim.max) == ("input_ids", 1, "seq", 2, 512)
    assert parse_dynamic("x:0:batch").min is None
    for bad in ("x:a:batch", "x:0", "x:0:seq=5..2", "x:0:seq=0..4"):
        with pytest.raises(OnnxqError):
            parse_dynamic(bad)
    for bad in ("x:1x0:float32", "x:1x2:float32:3..1", "x:1x2:float32:abc"):
        with pytest.raises(OnnxqError):
            parse_input(bad)
