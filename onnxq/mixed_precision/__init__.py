"""Mixed precision: per-layer sensitivity (the sweep) and the precision assignment (the solver).

Modules, lowest first (each imports only the ones above it in this list):

- :mod:`.options`: the errors and the request checks both commands share;
- :mod:`.groups`: the layers, groups of plan nodes that share one precision;
- :mod:`.ranges`: activation ranges per candidate precision, from one calibration pass;
- :mod:`.candidates`: float model → candidate model (SmoothQuant folded in, opset, plan assembly,
  Q/DQ insertion): the seams where the emit pipeline plugs in;
- :mod:`.costs`: MACs, element counts, the nominal roofline and measured latencies per layer;
- :mod:`.local`: the local sweep (quantized twins in one augmented graph);
- :mod:`.e2e`: the end-to-end evaluator (output accuracy and the task metric) and the e2e sweep;
- :mod:`.sweep`: :class:`~.sweep.SweepResult` and :func:`~.sweep.sweep`;
- :mod:`.search`: the solver's pure search (promotion order, MAC floor, count search);
- :mod:`.solver`: :func:`~.solver.solve` and its outputs.

The task metric is a plug-in (:mod:`onnxq.task_metric`): nothing here imports the zoo.
"""
