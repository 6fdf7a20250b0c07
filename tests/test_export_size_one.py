"""A dynamic dimension whose example size is 1 (issue 14, item 6): kept dynamic and verified at
other sizes when the exporter allows, else refused with the hint to give a size >= 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch; install onnxq[zoo] (torch==2.13.0 CPU)")

import torch_factories  # noqa: E402
from onnxq.cli import main  # noqa: E402
from onnxq.export import ExportError, export  # noqa: E402
from onnxq.runtime.ort import create_session  # noqa: E402

HINT = "give an example with size >= 2 on that axis"


class Squeeze(torch.nn.Module):
    def forward(self, x):  # exported with a dynamic input, but the Squeeze only holds for size 1
        return x.squeeze(0) * 2


def test_size_one_kept_dynamic_is_verified_at_other_sizes(tmp_path):
    module = torch_factories.mlp()
    result = export(module, {"x": torch.randn(1, 32)}, tmp_path / "mlp.onnx", dynamic=["x:0:batch"], random_checks=2)
    assert [c.feed for c in result.verification.checks if c.feed.startswith("random")] and all(
        "x[1," not in c.feed for c in result.verification.checks if c.feed.startswith("random"))  # sizes >= 2 were run
    session = create_session(tmp_path / "mlp.onnx")
    assert session.get_inputs()[0].shape[0] == "batch"
    x5 = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x5})[0], module(torch.from_numpy(x5)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("verify", [True, False])
def test_a_size_the_exporter_fixes_to_one_is_refused(tmp_path, verify):
    with pytest.raises(ExportError, match=r"input 'x' axis 0 is declared dynamic \('b'\) but the exported model fixes it to 1.*" + HINT):
        export(torch_factories.branch_on_batch(), {"x": torch.randn(1, 4)}, tmp_path / "b.onnx", dynamic=["x:0:b"], verify_outputs=verify)
    assert not (tmp_path / "b.onnx").exists()


def test_a_graph_that_only_runs_at_size_one_is_refused_with_the_hint(tmp_path):
    with pytest.raises(ExportError, match="Squeeze.*" + HINT):
        export(Squeeze(), {"x": torch.randn(1, 4)}, tmp_path / "s.onnx", dynamic=["x:0:b"])
    assert not (tmp_path / "s.onnx").exists()


def test_cli_refuses_with_the_hint(tmp_path, capsys):
    factories = Path(torch_factories.__file__)
    code = main(["export", f"{factories}:branch_on_batch", "-o", str(tmp_path / "b.onnx"), "--input", "x:1x4:float32", "--dynamic", "x:0:b"])
    err = capsys.readouterr().err
    assert code == 2 and HINT in err and err.startswith("onnxq: error: ") and "Traceback" not in err
    assert main(["export", f"{factories}:branch_on_batch", "-o", str(tmp_path / "ok.onnx"), "--input", "x:3x4:float32", "--dynamic", "x:0:b=2..8"]) == 0
