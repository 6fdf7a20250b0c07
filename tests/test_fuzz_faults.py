"""Seeded fuzz-and-fault suite (issue 13, docs/cli.md "Outputs and errors"): corrupt models, bad
data, bad options, output clashes, signals, a full disk and determinism.

Every case runs the CLI (in this process; signals in a subprocess) and checks the promises: exit 2
(130 for a signal), exactly one stderr line starting ``onnxq: error:`` (or ``onnxq:
interrupted``), no traceback, every input byte for byte unchanged and no new file (temporaries
and locks included). A case may only be "accepted" (exit 0) where the input is still a valid model
(a corruption protobuf tolerates): then its outputs must pass onnx.checker. ``pytest -s`` prints
tried / clean error / accepted per class.
"""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

import numpy as np
import onnx
import pytest

import synthetic
from onnxq import cli, modelio

SEED = 20261201
COUNTS: dict[str, Counter] = defaultdict(Counter)
ACCEPTED_EDITS: list[str] = []  # edits of a table or plan that left a usable file (printed)


@pytest.fixture(scope="module", autouse=True)
def per_class_counts():
    yield
    print("\nfuzz-and-fault cases per class (tried / clean error / accepted):")
    for cls, c in sorted(COUNTS.items()):
        print(f"  {cls:<16} {c['tried']:>4} {c['error']:>4} {c['accepted']:>4}")
    total = sum(COUNTS.values(), Counter())
    print(f"  {'total':<16} {total['tried']:>4} {total['error']:>4} {total['accepted']:>4}")
    for edit in ACCEPTED_EDITS:
        print(f"  accepted edit: {edit}")


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A model, its calibration and evaluation data, a plan and a table (made once)."""
    folder = tmp_path_factory.mktemp("base")
    synthetic.save(synthetic.residual_cnn(opset=13), folder / "m.onnx")
    synthetic.random_npz(folder / "calib.npz", "x", (1, 16, 8, 8), 4, seed=1)
    synthetic.random_npz(folder / "eval.npz", "x", (1, 16, 8, 8), 3, seed=2)
    assert cli.main(["quantize", str(folder / "m.onnx"), "--calib", str(folder / "calib.npz"), "-o", str(folder / "q.onnx"), "--save-plan", str(folder / "plan.json"), "-q", "--no-eval"]) == 0
    assert cli.main(["calibrate", str(folder / "m.onnx"), "--calib", str(folder / "calib.npz"), "-o", str(folder / "table.json"), "-q"]) == 0
    (folder / "q.report.json").unlink()
    return folder


@pytest.fixture
def work(base, tmp_path, monkeypatch):
    """A copy of the base files to run a case in (the working directory)."""
    for p in base.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_case(cls, folder, capsys, argv, outputs=()):
    """Run ``argv``; check the promises; count the outcome. ``outputs``: what an accepted run may write."""
    before = snapshot(folder)
    COUNTS[cls]["tried"] += 1
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before, "an input changed"
    if code == 0:
        COUNTS[cls]["accepted"] += 1
        assert set(after) - set(before) <= set(outputs), sorted(set(after) - set(before))
        for out in outputs:
            if out.endswith(".onnx") and out in after:
                onnx.checker.check_model(str(folder / out))
        for out in set(after) - set(before):
            (folder / out).unlink()  # the next case of the test starts from the inputs alone
        return code, err
    assert code == 2, err
    assert [line for line in err.splitlines() if line.startswith("onnxq:")] == [err.splitlines()[0]] and err.startswith("onnxq: error: "), err
    assert after == before, f"new files: {sorted(set(after) - set(before))}"
    COUNTS[cls]["error"] += 1
    return code, err


# --- corrupt models ---------------------------------------------------------------------------

COMMANDS = {
    "quantize": lambda m: ["quantize", m, "--calib", "calib.npz", "-o", "out.onnx", "-q"],
    "calibrate": lambda m: ["calibrate", m, "--calib", "calib.npz", "-o", "out.json", "-q"],
    "check": lambda m: ["check", "m.onnx", m, "--data", "eval.npz", "-o", "out", "--no-latency", "-q"],
    "check-ref": lambda m: ["check", m, "q.onnx", "--data", "eval.npz", "-o", "out", "--no-latency", "-q"],
    "inspect": lambda m: ["inspect", m, "-o", "out.json"],
    "diff": lambda m: ["diff", "m.onnx", m, "-o", "out.json"],
}
OUTPUTS = ("out.onnx", "out.json", "out.report.json", "out.md", "out.html")


def _corruptions():
    """(id, function of the model's bytes), seeded: truncations, random bytes, wrong magic."""
    rng = np.random.default_rng(SEED)
    cases = [(f"truncated at {f:.2f}", lambda b, f=f: b[: int(len(b) * f)]) for f in sorted(rng.uniform(0.05, 0.95, 4))]
    cases += [("truncated to 3 bytes", lambda b: b[:3]), ("empty", lambda b: b"")]
    cases += [(f"{n} random bytes", lambda b, n=n, s=s: np.random.default_rng(s).bytes(n)) for n, s in ((17, 1), (4096, 2))]
    cases += [(f"magic {m!r}", lambda b, m=m: m + b[len(m):]) for m in (b"\x89PNG\r\n\x1a\n", b"PK\x03\x04", b"\xff\xff\xff\xff")]
    cases += [("a text file", lambda b: b"ir_version: 8\ngraph {\n")]
    return cases


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda c: c[0])
def test_corrupt_models(work, capsys, corrupt):
    (work / "bad.onnx").write_bytes(corrupt[1]((work / "m.onnx").read_bytes()))
    for command in COMMANDS.values():
        run_case("corrupt model", work, capsys, command("bad.onnx"), OUTPUTS)


# --- bad data ---------------------------------------------------------------------------------

SHAPE = (4, 1, 16, 8, 8)
BAD_DATA = {
    "wrong name": lambda p: np.savez(p, y=np.zeros(SHAPE, np.float32)),
    "extra array": lambda p: np.savez(p, x=np.zeros(SHAPE, np.float32), z=np.zeros(3)),
    "float64": lambda p: np.savez(p, x=np.zeros(SHAPE)),
    "int32": lambda p: np.savez(p, x=np.zeros(SHAPE, np.int32)),
    "wrong shape": lambda p: np.savez(p, x=np.zeros((4, 1, 16, 8, 9), np.float32)),
    "wrong rank": lambda p: np.savez(p, x=np.zeros((4, 16), np.float32)),
    "no samples": lambda p: np.savez(p, x=np.zeros((0, 1, 16, 8, 8), np.float32)),
    "NaN": lambda p: np.savez(p, x=np.full(SHAPE, np.nan, np.float32)),
    "Inf in one sample": lambda p: np.savez(p, x=np.concatenate([np.zeros((3, 1, 16, 8, 8), np.float32), np.full((1, 1, 16, 8, 8), np.inf, np.float32)])),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(SEED).bytes(300)),
    "truncated npz": lambda p: (np.savez(p, x=np.ones(SHAPE, np.float32)), p.write_bytes(p.read_bytes()[:900])),
    "object array": lambda p: np.savez(p, x=np.array([object()] * 4, dtype=object)),
    "a directory without npz": lambda p: p.mkdir(),
    "a missing file": lambda p: None,
    "module without function": lambda p: None,
}


@pytest.mark.parametrize("name", BAD_DATA.keys())
def test_bad_data(work, capsys, name):
    path = work / "bad.npz"
    BAD_DATA[name](path)
    source = "os:no_such_function" if name == "module without function" else path.name
    run_case("bad data", work, capsys, ["quantize", "m.onnx", "--calib", source, "-o", "out.onnx", "-q"])
    if name not in ("NaN", "Inf in one sample"):  # evaluation data may hold non-finite values
        run_case("bad data", work, capsys, ["quantize", "m.onnx", "--calib", "calib.npz", "--eval", source, "-o", "out.onnx", "-q"])
        run_case("bad data", work, capsys, ["check", "m.onnx", "q.onnx", "--data", source, "-o", "out", "--no-latency", "-q"])
    run_case("bad data", work, capsys, ["calibrate", "m.onnx", "--calib", source, "-o", "out.json", "-q"])


# --- bad options, tables and plans ------------------------------------------------------------

Q = ["quantize", "m.onnx", "--calib", "calib.npz", "-o", "out.onnx", "-q"]
BAD_OPTIONS = {
    "misspelt option": [*Q, "--precison", "fp8"],
    "unknown subcommand": ["quantise", "m.onnx"],
    "bad choice": [*Q, "--target", "tensorrtt"],
    "not a number": [*Q, "--calib-samples", "many"],
    "zero samples": [*Q, "--calib-samples", "0"],
    "alpha above 1": [*Q, "--smoothquant", "2"],
    "percentile 200": [*Q, "--calib-method", "percentile", "--percentile", "200"],
    "percentile without its method": [*Q, "--percentile", "99.9"],
    "split without smoothquant": [*Q, "--split-outliers", "4"],
    "exclude matching nothing": [*Q, "--exclude", "no_such_node"],
    "bad regex": [*Q, "--exclude", "(["],
    "plan with another precision": ["quantize", "m.onnx", "--plan", "plan.json", "--precision", "fp8", "-o", "out.onnx", "-q"],
    "no calibration": ["quantize", "m.onnx", "-o", "out.onnx"],
    "missing required": ["calibrate", "m.onnx", "--calib", "calib.npz"],
    "plan is the model": ["quantize", "m.onnx", "--plan", "m.onnx", "-o", "out.onnx", "-q"],
    "table is the data": ["quantize", "m.onnx", "--table", "calib.npz", "-o", "out.onnx", "-q"],
    "recipe is binary": [*Q, "--recipe", "calib.npz"],
    "recipe is a directory": [*Q, "--recipe", "."],
    "table is a directory": ["quantize", "m.onnx", "--table", ".", "-o", "out.onnx", "-q"],
}


@pytest.mark.parametrize("argv", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options(work, capsys, argv):
    run_case("bad options", work, capsys, argv)


def _edit_json(path, seed):
    """One seeded edit of a JSON file: a value replaced by NaN, inf, -1, null, a list or a string."""
    import json

    rng = np.random.default_rng(seed)
    data = json.loads(path.read_text())
    spots = []

    def walk(node, trail):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*trail, k))
        if isinstance(node, (int, float)) and not isinstance(node, bool) or node is None:
            spots.append(trail)

    walk(data, ())
    trail = spots[int(rng.integers(len(spots)))]
    holder = data
    for key in trail[:-1]:
        holder = holder[key]
    holder[trail[-1]] = [float("nan"), float("inf"), -1, None, [1, 2], "x", {"a": 1}][int(rng.integers(7))]
    path.write_text(json.dumps(data))
    return "/".join(map(str, trail)), holder[trail[-1]]


@pytest.mark.parametrize("seed", range(40))
def test_edited_tables_and_plans(work, capsys, seed):
    """A random field of a table or a plan set to a wrong value: a clean error, or (a value that
    changes nothing the command reads, e.g. a count in the plan's summary) a valid output."""
    for name, option, offset in (("table.json", "--table", 0), ("plan.json", "--plan", 100)):
        field, value = _edit_json(work / name, SEED + offset + seed)
        code, _ = run_case("edited table/plan", work, capsys, ["quantize", "m.onnx", option, name, "-o", "out.onnx", "-q", "--no-eval"], ("out.onnx", "out.report.json"))
        if code == 0:
            ACCEPTED_EDITS.append(f"{name} {field} = {value!r}")


# --- output clashes ---------------------------------------------------------------------------

CLASHES = {
    "-o over --calib": [*Q[:-3], "-o", "calib.npz", "-q"],
    "-o over the model": [*Q[:-3], "-o", "m.onnx", "-q"],
    "--save-plan over -o": [*Q, "--save-plan", "out.onnx"],
    "--save-plan over the report": [*Q, "--save-plan", "out.report.json"],
    "--save-plan over --plan": ["quantize", "m.onnx", "--plan", "plan.json", "--save-plan", "plan.json", "-o", "out.onnx", "-q"],
    "calibrate -o over --calib": ["calibrate", "m.onnx", "--calib", "calib.npz", "-o", "calib.npz", "-q"],
    "diff -o over B": ["diff", "m.onnx", "q.onnx", "-o", "q.onnx"],
    "inspect -o over the model": ["inspect", "m.onnx", "-o", "m.onnx"],
    "check BASE.json over --data": ["check", "m.onnx", "q.onnx", "--data", "data.json", "-o", "data", "-q"],
    "-o in a missing folder": [*Q[:-3], "-o", "no/such/out.onnx", "-q"],
    "-o through a file": [*Q[:-3], "-o", "m.onnx/out.onnx", "-q"],
    "-o a directory": [*Q[:-3], "-o", ".", "-q"],
    "-o name too long": [*Q[:-3], "-o", "n" * 300 + ".onnx", "-q"],
}


@pytest.mark.parametrize("argv", CLASHES.values(), ids=CLASHES.keys())
def test_output_clashes(work, capsys, argv):
    (work / "data.json").write_bytes((work / "eval.npz").read_bytes())  # data under a report's name
    run_case("output clash", work, capsys, argv)


# --- a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "plan", "report", "table"])
def test_a_full_disk(work, capsys, monkeypatch, where):
    """ENOSPC (simulated: the machine offers no small tmpfs to fill) while one output is written."""
    real_save, real_write_text = modelio.ir.save, type(work).write_text

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out")

    if where == "model":
        monkeypatch.setattr(modelio.ir, "save", full)
    else:
        suffix = {"plan": "plan.json", "report": "report.json", "table": "out.json"}[where]

        def write_text(self, *args, **kwargs):
            if suffix in self.name:
                full()
            return real_write_text(self, *args, **kwargs)

        monkeypatch.setattr(type(work), "write_text", write_text)
    argv = ["calibrate", "m.onnx", "--calib", "calib.npz", "-o", "out.json", "-q"] if where == "table" else [*Q, "--save-plan", "out.plan.json"]
    _, err = run_case("full disk", work, capsys, argv)
    assert "No space left" in err
    assert real_save is not None


# --- signals ----------------------------------------------------------------------------------

SLOW = "import time\nimport numpy as np\ndef data():\n    for i in range(400):\n        open('{marker}', 'w').close()\n        time.sleep(0.05)\n        yield {{'x': np.ones((1, 16, 8, 8), np.float32)}}\n"


def _started(proc, work, point):
    """Whether the run reached ``point``: its data source's marker file, or (start-up) onnxq's
    SIGTERM handler installed (bit 15 of the caught-signals mask in /proc)."""
    if point != "start-up":
        return (work / point).exists()
    with open(f"/proc/{proc.pid}/status") as f:
        mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("point", ["start-up", "calibration", "evaluation"])
def test_sigint(work, point):
    """SIGINT as the command starts, while calibrating or while evaluating (seeded delay)."""
    (work / "slow.py").write_text(SLOW.format(marker=point))
    data = ["--calib", "slow:data", "--calib-samples", "400"] if point != "evaluation" else ["--calib", "calib.npz", "--eval", "slow:data"]
    before = snapshot(work)
    COUNTS["signal"]["tried"] += 1
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", "m.onnx", *data, "-o", "out.onnx", "--save-plan", "out.plan.json", "-q"],
                            cwd=work, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, preexec_fn=synthetic.default_sigint)
    deadline = time.monotonic() + 60
    while not _started(proc, work, point):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.005)
    time.sleep(np.random.default_rng(SEED + len(point)).uniform(0.0 if point == "start-up" else 0.05, 0.5))
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    err = proc.stderr.read()
    proc.stderr.close()
    assert code == 130 and "Traceback" not in err and err.strip().splitlines() == ["onnxq: interrupted"], err
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k != point} == before  # nothing but the data source's marker
    COUNTS["signal"]["error"] += 1


# --- determinism ------------------------------------------------------------------------------


def test_same_inputs_give_the_same_bytes(work, capsys):
    COUNTS["determinism"]["tried"] += 1
    for run in ("a", "b"):
        assert cli.main(["quantize", "m.onnx", "--calib", "calib.npz", "-o", f"{run}.onnx", "--save-plan", f"{run}.plan.json", "-q", "--no-eval"]) == 0
        assert cli.main(["calibrate", "m.onnx", "--calib", "calib.npz", "-o", f"{run}.table.json", "-q"]) == 0
        assert cli.main(["quantize", "m.onnx", "--table", f"{run}.table.json", "-o", f"{run}.t.onnx", "-q", "--no-eval"]) == 0
    for name in (".onnx", ".plan.json", ".table.json", ".t.onnx"):
        assert (work / f"a{name}").read_bytes() == (work / f"b{name}").read_bytes(), name
    assert (work / "a.onnx").read_bytes() == (work / "a.t.onnx").read_bytes()  # --table equals --calib on the same data
    capsys.readouterr()
    COUNTS["determinism"]["accepted"] += 1
