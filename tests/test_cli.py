"""The console entry points."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True, text=True)


def test_zoo_list_names_every_model():
    proc = _run("zoo", "list")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["minilm-l6-v2", "efficientnet-lite0", "smollm2-135m", "smollm2-6l"]


def test_unknown_zoo_model_is_a_clean_error(tmp_path):
    proc = _run("zoo", "export", "resnet", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "minilm-l6-v2" in proc.stderr


def test_help_lists_the_commands():
    proc = _run("--help")
    assert proc.returncode == 0 and "quantize" in proc.stdout and "zoo" in proc.stdout
