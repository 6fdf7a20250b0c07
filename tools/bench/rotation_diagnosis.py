"""What holds an all-8-bit rotated decoder back, measured: the zoo's SmolLM2 6 layers quantized
once (``--rotate --rotate-online B``, SmoothQuant, MinMax, ``tensorrt`` target, plan saved), then
the same plan replayed with one class of quantized inputs kept in float at a time.

    python tools/bench/rotation_diagnosis.py [--model smollm2-6l|smollm2-135m] [--smoothquant auto|none] [--online 128]
        [--precision int8|fp8] [--only LABEL ...] [--probs-methods entropy percentile mse]
        [--unnormalized-probs] [--out diag.json]

Rows: all 8-bit; only the weights quantized (activations float); only the activations (weights
float); per class of MatMul — the norms' readers Q/K/V (``qkv``), gate/up (``gateup``), the LM
head (``head``), the writers ``o_proj`` (``o``) and ``down_proj`` (``down``), attention's Q·Kᵀ
(``qk``) and P·V (``pv``: also P and V apart) — its activation inputs kept float, then the whole
node. Classes come from the plan's rotation (norm readers by their count, writers, online
writers) and the graph (a P·V MatMul reads a Softmax's output). ``--probs-methods``: rows with
every MatMul in 8 bits but P's range (the Softmax outputs P·V reads) taken from that range
method's plan (the model quantized once more with it; only P's entries copied).
``--unnormalized-probs``: a row where each Softmax is rewritten (exact in float, FlashAttention's
order) as ``exp(s - rowmax(s))`` into P·V and the product divided by the row sum after, so every
row of P reaches 1 and uses the whole INT8 grid. The rotations are folded first (the per-head
ones look for the Softmax), the rewrite is applied to the rotated float model, which is then
quantized like the base without ``--rotate`` (the inserted online Hadamard MatMuls excluded, so
float as with ``--rotate-online``); a control row quantizes the same pre-rotated model without the
rewrite. Metrics: the
zoo's top-1 agreement and KL against FP32.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import onnx


def node_classes(plan, model_path) -> dict[str, str]:
    rotation = plan.rotation
    classes = {}
    for norm in rotation.norms:
        for reader in norm.readers:
            classes[reader] = {3: "qkv", 2: "gateup", 1: "head"}.get(len(norm.readers), "reader")
    for writer in rotation.writers:
        classes[writer] = "down" if writer in rotation.online else "o"
    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}

    def reads_softmax(tensor: str) -> bool:
        node = producer.get(tensor)
        for _ in range(4):
            if node is None or node.op_type == "Softmax":
                break
            node = producer.get(node.input[0]) if node.input else None
        return node is not None and node.op_type == "Softmax"

    for name, decision in plan.nodes.items():
        if name not in classes and decision.inputs and set(decision.inputs.values()) == {"activation"}:
            classes[name] = "pv" if reads_softmax(nodes[name].input[0]) else "qk"
    return classes


def variants(classes: dict[str, str]) -> dict:
    """label -> keep(node, input index, kind): True keeps that input float."""
    out = {
        "all 8-bit": lambda n, i, k: False,
        "weights only (activations float)": lambda n, i, k: k == "activation",
        "activations only (weights float)": lambda n, i, k: k == "weight",
    }
    for c in ("qkv", "o", "gateup", "down", "qk", "pv", "head"):
        out[f"{c}: activations float"] = lambda n, i, k, c=c: classes.get(n) == c and k == "activation"
        if c not in ("qk", "pv"):
            out[f"{c}: node float"] = lambda n, i, k, c=c: classes.get(n) == c
    out["pv: P float"] = lambda n, i, k: classes.get(n) == "pv" and i == 0
    out["pv: V float"] = lambda n, i, k: classes.get(n) == "pv" and i == 1
    return out


def without(plan, keep):
    plan = copy.deepcopy(plan)
    for name, decision in plan.nodes.items():
        decision.inputs = {i: k for i, k in decision.inputs.items() if not keep(name, i, k)}
        if not decision.inputs:
            decision.precision = "float"
    return plan


def with_probs_from(plan, other, classes, model_path):
    """``plan`` with the INT8 ranges of the P·V nodes' first inputs (P) copied from ``other``."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    first_input = {n.name: n.input[0] for n in graph.node}
    plan = copy.deepcopy(plan)
    for name in (n for n, c in classes.items() if c == "pv"):
        tensor = first_input[name]
        plan.activations[tensor] = copy.deepcopy(other.activations[tensor])
    return plan


def prerotated(path, online: int, out) -> list[str]:
    """Write ``path`` with the rotations of ``--rotate --rotate-online online`` folded (float);
    returns the inserted online Hadamard MatMuls."""
    from onnxq import emit, modelio
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.plan import QuantPlan
    from onnxq.rotation import find_residual_stream

    model = load_and_preprocess(path)
    before = {n.name for n in model.graph}
    plan = QuantPlan(target="tensorrt")
    plan.rotation = find_residual_stream(model, online_block=online)
    emit.emit(model, plan, ["rotate"])
    onnx.save(modelio.to_proto(model), str(out))
    return sorted(n.name for n in model.graph if n.op_type == "MatMul" and n.name not in before)


def unnormalized_probs(path, out) -> None:
    """Write ``path`` with each Softmax feeding one P·V MatMul replaced by exp(s - rowmax) and
    the P·V output divided by the row sum of those exps (the same function in float)."""
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph.initializer.append(helper.make_tensor("rowmax_axes", TensorProto.INT64, [1], [-1]))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes, divisions = [], {}
    for node in graph.node:
        users = readers.get(node.output[0], []) if node.op_type == "Softmax" else []
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != node.output[0]:
            nodes.append(node)
            continue
        s, k, pv = node.input[0], node.name, users[0]
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
            rowmax = helper.make_node("ReduceMax", [s, "rowmax_axes"], [k + "_max"], name=k + "_max", keepdims=1)
        else:
            rowmax = helper.make_node("ReduceMax", [s], [k + "_max"], name=k + "_max", keepdims=1, axes=[-1])
        nodes += [rowmax,
                  helper.make_node("Sub", [s, k + "_max"], [k + "_shifted"], name=k + "_sub"),
                  helper.make_node("Exp", [k + "_shifted"], [node.output[0]], name=k + "_exp"),
                  helper.make_node("ReduceSum", [node.output[0], "rowmax_axes"], [k + "_sum"], name=k + "_sum", keepdims=1)]
        divisions[pv.name] = helper.make_node("Div", [pv.output[0] + "_unnormalized", k + "_sum"], [pv.output[0]], name=k + "_div")
        pv.output[0] += "_unnormalized"
    ordered = []
    for node in nodes:
        ordered += [node, divisions[node.name]] if node.name in divisions else [node]
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(out))


def plan_rows(args, entry, case, work: Path, sq) -> list[dict]:
    """The model quantized once (plan saved), then the plan's variants replayed, one row each."""
    import onnxq
    from onnxq.plan import QuantPlan

    onnxq.quantize(case["model"], work / "q.onnx", case["calib"], target="tensorrt", precision=args.precision, method="minmax", smoothquant=sq,
                   rotate=True, rotate_online=args.online, save_plan=work / "plan.json", report=False, evaluate=False, quiet=True)
    plan = QuantPlan.load(work / "plan.json")
    classes = node_classes(plan, case["model"])
    plans = {label: without(plan, keep) for label, keep in variants(classes).items() if not args.only or any(o in label for o in args.only)}
    for method in args.probs_methods:
        onnxq.quantize(case["model"], work / "m.onnx", case["calib"], target="tensorrt", precision=args.precision, method=method, smoothquant=sq,
                       rotate=True, rotate_online=args.online, save_plan=work / "m.json", report=False, evaluate=False, quiet=True)
        plans[f"all 8-bit, P's range from {method}"] = with_probs_from(plan, QuantPlan.load(work / "m.json"), classes, case["model"])
    rows = []
    for label, variant in plans.items():
        onnxq.quantize(case["model"], work / "v.onnx", case["calib"], plan=variant, report=False, evaluate=False, quiet=True)
        rows.append(row(label, entry.evaluate(work / "v.onnx")))
    return rows


def unnormalized_rows(args, entry, case, work: Path, sq) -> list[dict]:
    """The rotated float model quantized without and with the unnormalized-P rewrite."""
    import onnxq

    inserted = prerotated(case["model"], args.online, work / "r.onnx")
    unnormalized_probs(work / "r.onnx", work / "u.onnx")
    rows = []
    for label, model in (("all 8-bit, rotated beforehand (control)", "r.onnx"), ("all 8-bit, P unnormalized (exp(s - rowmax), divided after P·V)", "u.onnx")):
        onnxq.quantize(work / model, work / "v.onnx", case["calib"], target="tensorrt", precision=args.precision, method="minmax", smoothquant=sq,
                       exclude=inserted, report=False, evaluate=False, quiet=True)
        rows.append(row(label, entry.evaluate(work / "v.onnx")))
    return rows


def row(label: str, metrics: dict) -> dict:
    out = {"variant": label, **{k: round(v, 4) for k, v in metrics.items() if k in ("top1_agreement", "kl", "perplexity")}}
    print(json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-6l", help="zoo decoder: smollm2-6l or smollm2-135m")
    ap.add_argument("--smoothquant", default="auto")
    ap.add_argument("--online", type=int, default=128)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--only", nargs="*", default=[], help="run only the rows whose label contains one of these ('-': none of the plan's rows)")
    ap.add_argument("--probs-methods", nargs="*", default=[], help="rows with P's range from these range methods")
    ap.add_argument("--unnormalized-probs", action="store_true", help="rows with each Softmax rewritten as exp(s - rowmax), divided after P·V")
    ap.add_argument("--out", default="bench_rotation_diagnosis.json")
    args = ap.parse_args()
    from onnxq import zoo

    entry = zoo.get(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-rot-diag-") as tmp:
        work = Path(tmp)
        case = zoo.export_case(args.model, work / "case")
        sq = None if args.smoothquant == "none" else args.smoothquant
        if args.only != ["-"]:
            rows += plan_rows(args, entry, case, work, sq)
        if args.unnormalized_probs:
            rows += unnormalized_rows(args, entry, case, work, sq)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
