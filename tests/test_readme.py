"""README's two commands stay true: CI runs the test command, and the quick start names real flags."""

import re
from pathlib import Path

from onnxq.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmd = next(b for b in blocks if "pytest" in b).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_quick_start_parses():
    readme = (ROOT / "README.md").read_text()
    quick = next(b for b in _bash_blocks(readme) if "onnxq quantize" in b).strip()
    parser = build_parser()
    for part in quick.split("&&"):
        words = part.split()
        if words and words[0].endswith("onnxq"):
            parser.parse_args(words[1:])  # raises SystemExit on an unknown flag
