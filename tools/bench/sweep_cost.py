"""Cost of the sensitivity sweep: local (one ORT pass with quantized twins) vs end to end (one
quantized model per layer and precision), both against one calibration pass, with the Spearman
rank correlation between the two modes' per-layer SNRs.

For each model, in one process: ``onnxq.sweep(mode="both")`` on the same N samples for
calibration and measurement. Its timings are the calibration pass (min/max + histograms, as
``onnxq quantize`` runs it), the local sweep (building the augmented graph and its session, and
the pass itself) and the e2e sweep; ratios are taken in the same process, so machine drift
between runs mostly cancels.

    python tools/bench/sweep_cost.py [--models minilm-l6-v2 efficientnet-lite0] [--samples 32]
                                     [--precisions int8,fp8] [--out sweep_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _feeds(arrays):
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]


def run(name: str, samples: int, precisions: str, workdir: Path) -> dict:
    import onnxq
    from onnxq import zoo

    entry = zoo.get(name)
    model = entry.onnx_path()
    feeds = _feeds(entry.calib_data(samples))
    result = onnxq.sweep(model, feeds, workdir / f"{name}.sweep.json", eval=feeds, mode="both", precisions=precisions, quiet=True)
    t = result.timings
    row = {
        "model": name,
        "samples": len(feeds),
        "layers": len(result.layers),
        "precisions": result.precisions,
        "calibration_s": t["calibrate"],
        "local_pass_s": t["local_pass"],
        "local_total_s": t["local"],
        "e2e_s": t["e2e"],
        "local_pass_over_calibration": t["local_pass"] / t["calibrate"],
        "local_total_over_calibration": t["local"] / t["calibrate"],
        "e2e_over_calibration": t["e2e"] / t["calibrate"],
        "e2e_over_local_total": t["e2e"] / t["local"],
        "spearman": result.spearman,
        "sweep_json": str(workdir / f"{name}.sweep.json"),
    }
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm-l6-v2", "efficientnet-lite0"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--precisions", default="int8,fp8")
    ap.add_argument("--out", default="sweep_cost.json")
    ap.add_argument("--keep", metavar="DIR", help="keep the sweep JSON/MD/PNG files in DIR")
    args = ap.parse_args()
    os.environ.setdefault("ONNXQ_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory(prefix="onnxq-sweep-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [run(m, args.samples, args.precisions, workdir) for m in args.models]
    print()
    print("| model | layers x precisions | samples | calibration s | local sweep s (pass / with build) | e2e sweep s | local / calibration (pass / with build) | e2e / calibration | Spearman local vs e2e |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rho = ", ".join(f"{k} {v:.2f}" for k, v in r["spearman"].items() if v is not None)
        print(
            f"| {r['model']} | {r['layers']} x {len(r['precisions'])} | {r['samples']} | {r['calibration_s']:.1f} | "
            f"{r['local_pass_s']:.1f} / {r['local_total_s']:.1f} | {r['e2e_s']:.1f} | "
            f"{r['local_pass_over_calibration']:.2f}x / {r['local_total_over_calibration']:.2f}x | {r['e2e_over_calibration']:.1f}x | {rho} |"
        )
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
