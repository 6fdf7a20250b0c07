"""Turn ``Constant`` nodes into initializers.

Rule: every ``Constant`` node of the default domain, whatever its size (scalars included) and
whichever attribute carries its value (``value``, ``value_float(s)``, ``value_int(s)``,
``value_string(s)``), is replaced by an initializer of the same name, dtype and shape. Later
passes (constant folding, BatchNorm folding, SmoothQuant, Q/DQ insertion) read weights and
constants from initializers only, so after this pass there is one place to look.

Built on :class:`onnx_ir.passes.common.LiftConstantsToInitializersPass`, which by default keeps
constants of fewer than 16 elements and those given by ``value_*`` attributes as nodes; here it
runs with ``lift_all_constants=True, size_limit=0``. What it still leaves as nodes (by design):
a ``Constant`` whose output is directly a graph output (an initializer cannot be one without
changing the model's signature), and constants inside model-local functions (functions have no
initializers). Constants inside subgraphs (If/Loop/Scan bodies) become initializers of that
subgraph.
"""

from __future__ import annotations

__all__ = ["LiftConstantsPass"]

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass


class LiftConstantsPass(ir.passes.InPlacePass):
    """Replace every ``Constant`` node (any size, any ``value*`` attribute) by an initializer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        return ir.passes.PassResult(model, modified=result.modified)
