"""The promises about inputs and outputs (docs/cli.md, "Outputs and errors"): no output overwrites an
input or another output; a command's outputs appear together or not at all (errors and signals
included) and leave no temporary behind; a second writer of the same outputs is refused;
external-data models work from any folder and give self-contained outputs; user errors are one
line, exit 2, no traceback."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import synthetic
from onnxq import cli, modelio
from test_bad_input import assert_clean_error
from onnxq.errors import OutputPathError
from onnxq.runtime.ort import create_session


def run_main(capsys, *args):
    """The CLI in this process (fast: clashes are refused before any work)."""
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def snapshot(folder):
    """{name: bytes} of every file in ``folder`` (hidden ones included)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def files(tmp_path, cnn_case):
    """A model, its data, and one existing file of each input kind a command can take."""
    model, calib, evald = cnn_case
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "table.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text("target: ort\n")
    (tmp_path / "sweep.json").write_text("{}")
    (tmp_path / "costs.json").write_text("{}")
    (tmp_path / "factory.py").write_text("def build():\n    raise RuntimeError\n")
    (tmp_path / "b.onnx").write_bytes(model.read_bytes())
    (tmp_path / "r.json").write_bytes(calib.read_bytes())  # data under an unusual name
    (tmp_path / "rep.json").write_bytes(model.read_bytes())  # a candidate named like a report
    return tmp_path


Q = ["quantize", "cnn.onnx", "--calib", "calib.npz", "-q"]
SOLVE = ["solve", "sweep.json", "cnn.onnx", "--calib", "calib.npz", "--eval", "eval.npz", "--target-cosine", "0.9"]
CLASHES = {
    "quantize -o over --calib": [*Q, "-o", "calib.npz"],
    "quantize -o over the model": [*Q, "-o", "cnn.onnx"],
    "quantize --save-plan over -o": [*Q, "-o", "q.onnx", "--save-plan", "q.onnx"],
    "quantize --save-plan over the report": [*Q, "-o", "q.onnx", "--save-plan", "q.report.json"],
    "quantize --save-plan over --eval": [*Q, "-o", "q.onnx", "--eval", "eval.npz", "--save-plan", "eval.npz"],
    "quantize --save-plan over --plan": [*Q, "-o", "q.onnx", "--plan", "plan.json", "--save-plan", "plan.json"],
    "quantize --save-plan over --table": [*Q, "-o", "q.onnx", "--table", "table.json", "--save-plan", "table.json"],
    "quantize --save-plan over --recipe": [*Q, "-o", "q.onnx", "--recipe", "recipe.yaml", "--save-plan", "recipe.yaml"],
    "calibrate -o over --calib": ["calibrate", "cnn.onnx", "--calib", "calib.npz", "-o", "calib.npz"],
    "diff -o over B": ["diff", "cnn.onnx", "b.onnx", "-o", "b.onnx"],
    "inspect -o over the model": ["inspect", "cnn.onnx", "-o", "cnn.onnx"],
    "sweep -o over --eval": ["sweep", "cnn.onnx", "--calib", "calib.npz", "--eval", "eval.npz", "-o", "eval.npz"],
    "sweep -o over the model": ["sweep", "cnn.onnx", "--calib", "calib.npz", "-o", "cnn.onnx"],
    "solve -o over the sweep": [*SOLVE, "-o", "sweep.json"],
    "solve --save-model over the model": [*SOLVE, "-o", "p.json", "--save-model", "cnn.onnx"],
    "solve --save-model over -o": [*SOLVE, "-o", "p.json", "--save-model", "p.json"],
    "solve -o over --latency-json": [*SOLVE, "-o", "costs.json", "--latency-json", "costs.json"],
    "check BASE.json over --data": ["check", "cnn.onnx", "--data", "r.json", "-o", "r", "-q"],
    "check BASE.json over a candidate": ["check", "cnn.onnx", "rep.json", "--data", "calib.npz", "-o", "rep", "-q"],
    "export -o over the factory file": ["export", "factory.py:build", "-o", "factory.py", "--input", "x:1x4:float32"],
    "build -o over the model": ["build", "cnn.onnx", "-o", "cnn.onnx"],
}


@pytest.mark.parametrize("argv", CLASHES.values(), ids=CLASHES.keys())
def test_an_output_over_an_input_or_another_output_is_refused_before_any_work(files, monkeypatch, capsys, argv):
    monkeypatch.chdir(files)
    before = snapshot(files)
    code, err = run_main(capsys, *argv)
    assert_clean_error(code, err)
    assert "is the input" in err or "is an input" in err or "same file" in err or "inside the data folder" in err, err
    assert snapshot(files) == before  # nothing written, nothing changed


def test_outputs_that_cannot_be_written_are_refused_before_any_work(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    cases = {
        "through a file": ("calib.npz/q.onnx", "is a file"),
        "name too long": ("q" * 300 + ".onnx", "too long"),
        "missing folder": ("nope/q.onnx", "does not exist"),
        "a directory": (".", "is a directory"),
    }
    for output, needle in cases.values():
        code, err = run_main(capsys, *Q, "-o", output)
        assert_clean_error(code, err, needle)


def test_a_failure_after_the_work_leaves_no_output_and_keeps_earlier_ones(files, monkeypatch, capsys):
    """Evaluation data that fails at its third sample, after calibration and emit: no model, no
    plan, no report, no temporary; the report of an earlier run is untouched."""
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(files))
    (files / "flaky.py").write_text(
        "import numpy as np\n"
        "def data():\n"
        "    for i in range(8):\n"
        "        if i == 2:\n"
        "            raise OSError('the network share went away')\n"
        "        yield {'x': np.ones((1, 16, 8, 8), np.float32)}\n"
    )
    (files / "q.report.json").write_text("earlier run")
    before = snapshot(files)
    code, err = run_main(capsys, *Q, "-o", "q.onnx", "--save-plan", "q.plan.json", "--eval", "flaky:data")
    assert_clean_error(code, err, "flaky:data, sample 2", "network share")
    assert snapshot(files) == before


def test_a_write_that_fails_at_commit_leaves_nothing(files, monkeypatch, capsys):
    """A disk that fills up while the outputs are renamed into place (simulated ENOSPC)."""
    monkeypatch.chdir(files)
    before = snapshot(files)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".report.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(modelio.os, "replace", replace)
    code, err = run_main(capsys, *Q, "-o", "q.onnx", "--no-eval")
    assert_clean_error(code, err, "No space left")
    leftovers = set(snapshot(files)) - set(before)
    assert leftovers <= {"q.onnx"}  # renamed before the failing one; no temporary or lock remains


def test_an_oserror_while_writing_is_one_line(files, monkeypatch, capsys):
    monkeypatch.chdir(files)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "q.onnx")

    monkeypatch.setattr(modelio.ir, "save", full)
    before = snapshot(files)
    code, err = run_main(capsys, *Q, "-o", "q.onnx", "--no-eval")
    assert_clean_error(code, err, "No space left")
    assert snapshot(files) == before


def test_a_second_writer_of_the_same_output_is_refused(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (files / ".q.onnx.lock").write_text(str(sleeper.pid))  # a live run holds q.onnx
        code, err = run_main(capsys, *Q, "-o", "q.onnx", "--no-eval")
        assert_clean_error(code, err, "another onnxq run", str(sleeper.pid))
        assert not (files / "q.onnx").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the run is gone (as after SIGKILL): its lock and temporaries are stale, taken over and removed
    (files / f".q.onnx.tmp{sleeper.pid}.abc.onnx").write_text("partial")
    killed_mid_external_data = files / f".q.onnx.tmp{sleeper.pid}.def"  # SIGKILL while writing .data
    killed_mid_external_data.mkdir()
    (killed_mid_external_data / "q.onnx.data").write_bytes(bytes(1000))
    code, err = run_main(capsys, *Q, "-o", "q.onnx", "--no-eval")
    assert code == 0, err
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".q.")) == []


def test_a_run_writing_the_outputs_of_a_running_one_is_refused(files):
    """While a first run evaluates, a second one writing the same model, plan and report is
    refused before any work; the first run's outputs are then complete and its own."""
    (files / "held.py").write_text(
        "import pathlib, time\n"
        "import numpy as np\n"
        "def data():\n"
        "    pathlib.Path('evaluating').touch()\n"
        "    while not pathlib.Path('release').exists():  # until the second run has been tried\n"
        "        time.sleep(0.05)\n"
        "    for _ in range(4):\n"
        "        yield {'x': np.ones((1, 16, 8, 8), np.float32)}\n"
    )
    first = subprocess.Popen([sys.executable, "-m", "onnxq", *Q, "-o", "q.onnx", "--save-plan", "q.plan.json", "--eval", "held:data"], cwd=files, stderr=subprocess.PIPE, text=True, preexec_fn=synthetic.default_sigint)
    deadline = time.monotonic() + 120
    while not (files / "evaluating").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "onnxq", *Q, "-o", "q.onnx", "--save-plan", "q.plan.json", "--target", "ort"], cwd=files, capture_output=True, text=True)
    (files / "release").touch()
    assert_clean_error(second.returncode, second.stderr, "another onnxq run", str(first.pid))
    assert first.wait(timeout=120) == 0, first.stderr.read()
    first.stderr.close()
    report = json.loads((files / "q.report.json").read_text())
    assert report["target"] == "tensorrt" == json.loads((files / "q.plan.json").read_text())["target"]
    assert report["evaluation"]["data"] == "held:data"
    onnx.checker.check_model(str(files / "q.onnx"))
    assert not [p.name for p in files.iterdir() if p.name.startswith(".")]


# --- signals ----------------------------------------------------------------------------------


SLOW_EVAL = (
    "import pathlib, time\n"
    "import numpy as np\n"
    "def data():\n"
    "    pathlib.Path('evaluating').touch()\n"
    "    for _ in range(1000):\n"
    "        time.sleep(0.05)\n"
    "        yield {'x': np.ones((1, 16, 8, 8), np.float32)}\n"
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_evaluation_stops_the_run_and_leaves_nothing(files, sig):
    (files / "slow.py").write_text(SLOW_EVAL)
    before = set(snapshot(files))
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxq", *Q, "-o", "q.onnx", "--save-plan", "q.plan.json", "--eval", "slow:data"],
        cwd=files, stderr=subprocess.PIPE, text=True, preexec_fn=synthetic.default_sigint,
    )
    deadline = time.monotonic() + 120
    while not (files / "evaluating").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # inside the evaluation loop (the reference and candidate runners are up)
    sent = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    took = time.monotonic() - sent
    err = proc.stderr.read()
    proc.stderr.close()
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "onnxq: interrupted", err
    assert took < 2, took  # measured 0.5 s on a loaded 2-core machine
    assert set(snapshot(files)) - before == {"evaluating"}  # no model, plan, report, temporary or lock


def _catches_sigterm(pid):
    """Whether the process has its SIGTERM handler installed (onnxq's main has started): the
    caught-signals mask in /proc, bit 15."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_right_after_start_up_is_an_interruption(files, sig, delay):
    """Signals from the moment main() runs (the imports of onnx, onnx_ir, ORT and polygraphy
    happen inside it): exit 130, no traceback, nothing written."""
    before = set(snapshot(files))
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", *Q, "-o", "q.onnx"], cwd=files, stderr=subprocess.PIPE, text=True, preexec_fn=synthetic.default_sigint)
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    proc.stderr.close()
    if code == 0:  # the run had already finished (a very fast machine): its outputs are complete
        onnx.checker.check_model(str(files / "q.onnx"))
        return
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "onnxq: interrupted", err
    assert set(snapshot(files)) == before


# --- external data ----------------------------------------------------------------------------


def _external_data_model(folder):
    folder.mkdir()
    path = folder / "m.onnx"
    # The weights go to m.onnx.data; tensors under 1 KiB (Pad's pads) stay inline, as ORT's shape
    # inference cannot read a shape input from external data.
    onnx.save(synthetic.residual_cnn(opset=13), path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=1024)
    assert (folder / "m.onnx.data").exists()
    return path


def test_an_external_data_model_quantizes_from_another_folder_into_a_self_contained_output(tmp_path, cnn_case):
    _, calib, evald = cnn_case
    model = _external_data_model(tmp_path / "src")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "onnxq", "quantize", model, "-o", out, "--calib", calib, "--eval", evald, "-q"],
        cwd=elsewhere, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "src").rename(tmp_path / "gone")  # the input and its data file move away
    onnx.checker.check_model(str(out))
    assert not modelio.external_data_files(out)  # weights inline: no reference to m.onnx.data
    x = np.ones((1, 16, 8, 8), np.float32)
    assert np.isfinite(create_session(out).run(None, {"x": x})[0]).all()


def test_a_large_output_of_an_external_data_model_has_its_own_data_file(tmp_path, cnn_case, monkeypatch):
    import onnxq

    _, calib, _ = cnn_case
    model = _external_data_model(tmp_path / "src")
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q.onnx"
    onnxq.quantize(model, out, calib, evaluate=False, quiet=True)
    assert modelio.external_data_files(out) == [tmp_path / "q.onnx.data"]
    (tmp_path / "src").rename(tmp_path / "gone")
    onnx.checker.check_model(str(out))
    create_session(out)


def test_calibrate_and_check_read_an_external_data_model_from_another_folder(tmp_path, cnn_case, monkeypatch, capsys):
    _, calib, evald = cnn_case
    model = _external_data_model(tmp_path / "src")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = run_main(capsys, "calibrate", model, "--calib", calib, "-o", tmp_path / "t.json", "-q")
    assert code == 0, err
    code, err = run_main(capsys, "check", model, model, "--data", evald, "--no-latency", "-o", tmp_path / "rep", "-q")
    assert code == 0, err


def test_output_over_the_inputs_external_data_is_refused(tmp_path, cnn_case, capsys):
    _, calib, _ = cnn_case
    model = _external_data_model(tmp_path / "src")
    code, err = run_main(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "--save-plan", model.parent / "m.onnx.data", "-q")
    assert_clean_error(code, err, "external data")


# --- data sources: one line naming the source --------------------------------------------------


def _write(path, writer):
    writer(path)
    return path


BAD_DATA = {
    ".npy renamed .npz": (lambda p: np.save(open(p, "wb"), np.ones((2, 16, 8, 8), np.float32)), "single .npy array"),
    "object array": (lambda p: np.savez(p, x=np.array([object()] * 2, dtype=object)), "objects"),
    "0-d array": (lambda p: np.savez(p, x=np.float32(1.0)), "0-d"),
}


@pytest.mark.parametrize("writer, needle", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_unusable_npz_is_one_line(tmp_path, cnn_case, capsys, writer, needle):
    model, _, _ = cnn_case
    bad = _write(tmp_path / "bad.npz", writer)
    code, err = run_main(capsys, "quantize", model, "--calib", bad, "-o", tmp_path / "q.onnx", "-q")
    assert_clean_error(code, err, "bad.npz", needle)


def test_a_corrupt_npz_member_is_one_line(tmp_path, cnn_case, capsys):
    model, _, _ = cnn_case
    bad = tmp_path / "bad.npz"
    np.savez_compressed(bad, x=np.random.default_rng(0).normal(size=(4, 16, 8, 8)).astype(np.float32))
    raw = bytearray(bad.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(64)  # damage the compressed member, keep the directory
    bad.write_bytes(bytes(raw))
    code, err = run_main(capsys, "quantize", model, "--calib", bad, "-o", tmp_path / "q.onnx", "-q")
    assert_clean_error(code, err, "bad.npz")


FUNCTIONS = {
    "raises while iterating": ("def f():\n    yield {'x': np.ones((1, 16, 8, 8), np.float32)}\n    raise KeyError('shard 7')\n", "sample 1"),
    "returns a number": ("def f():\n    return 3\n", "returned a int"),
    "returns a dict": ("def f():\n    return {'x': np.ones((1, 16, 8, 8), np.float32)}\n", "returned a dict"),
    "yields lists": ("def f():\n    return [[1, 2]]\n", "expected a dict"),
}


@pytest.mark.parametrize("body, needle", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_a_bad_data_function_is_one_line(tmp_path, cnn_case, capsys, body, needle):
    model, _, _ = cnn_case
    (tmp_path / "gen.py").write_text("import numpy as np\n" + body)
    code, err = run_main(capsys, "quantize", model, "--calib", f"{tmp_path / 'gen.py'}:f", "-o", tmp_path / "q.onnx", "-q")
    assert_clean_error(code, err, "gen.py:f", needle)
    assert not (tmp_path / "q.onnx").exists()


def test_transaction_helper_commits_together_and_rolls_back_everything(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(KeyboardInterrupt):
        with modelio.transaction([a, b]):
            with modelio.atomic_path(a) as tmp:
                tmp.write_text("a")
            assert not a.exists()  # staged, not yet in place
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with modelio.transaction([a, b]):
        for dest in (a, b):
            with modelio.atomic_path(dest) as tmp:
                tmp.write_text(dest.name)
    assert a.read_text() == "a.txt" and b.read_text() == "b.txt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(OutputPathError, match="same file"):
        modelio.check_outputs([a, tmp_path / "." / "a.txt"])


# --- damaged models and plans -------------------------------------------------------------------


def _short_raw_data_model(path):
    proto = synthetic.residual_cnn(opset=13)
    init = next(i for i in proto.graph.initializer if len(i.raw_data) > 100)
    init.raw_data = init.raw_data[:52]  # a multiple of 4 bytes, far fewer than the shape needs
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("command", ["quantize", "inspect", "diff", "check"])
def test_a_model_with_short_raw_data_is_one_line(tmp_path, cnn_case, capsys, command):
    model, calib, _ = cnn_case
    short = _short_raw_data_model(tmp_path / "short.onnx")
    argv = {
        "quantize": ["quantize", short, "-o", tmp_path / "q.onnx", "--calib", calib, "-q"],
        "inspect": ["inspect", short],
        "diff": ["diff", short, model],
        "check": ["check", model, short, "--data", calib, "--no-latency", "-o", tmp_path / "rep", "-q"],
    }[command]
    code, err = run_main(capsys, *argv)
    assert_clean_error(code, err, "'w1'")  # the damaged initializer is named
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("q.", "rep.", "."))]


def test_check_with_a_candidate_that_is_not_onnx_is_one_line(tmp_path, cnn_case, capsys):
    model, calib, _ = cnn_case
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model\n")
    code, err = run_main(capsys, "check", model, junk, "--data", calib, "--no-latency", "-o", tmp_path / "rep", "-q")
    assert_clean_error(code, err, "junk.onnx", "not a readable ONNX model")
    assert not (tmp_path / "rep.json").exists()


@pytest.mark.parametrize("nodes", [[], None], ids=["list", "null"])
def test_a_plan_whose_nodes_are_not_a_mapping_is_one_line(tmp_path, cnn_case, capsys, nodes):
    model, calib, _ = cnn_case
    code, err = run_main(capsys, "quantize", model, "-o", tmp_path / "q.onnx", "--calib", calib, "--save-plan", tmp_path / "p.json", "--no-eval", "-q")
    assert code == 0, err
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["nodes"] = nodes
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    code, err = run_main(capsys, "quantize", model, "-o", tmp_path / "q2.onnx", "--plan", tmp_path / "bad.json", "-q")
    assert_clean_error(code, err, "bad.json is malformed")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_samples_are_read_one_by_one_and_exactly(tmp_path, save):
    """A stored member is memory-mapped in place (a sample reads its own bytes, not the whole
    array again); a compressed one is decompressed once per pass. Both give the saved values."""
    from onnxq import data

    x = np.random.default_rng(0).normal(size=(6, 16, 8, 8)).astype(np.float32)
    ids = np.arange(6, dtype=np.int64).reshape(6, 1)
    path = tmp_path / "d.npz"
    save(path, x=x, ids=ids)
    arrays = data._load_npz(path)
    mapped = data._mapped_member(arrays, "x", path)
    assert (mapped is not None) == (save is np.savez)
    spec = {"x": (np.float32, [1, 16, 8, 8]), "ids": (np.int64, [1])}
    feeds = list(data.open_source(path, spec))
    assert len(feeds) == 6
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["x"], x[i : i + 1])
        np.testing.assert_array_equal(feed["ids"], ids[i])
