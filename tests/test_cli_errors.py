"""One error format for everything a user can cause (docs/cli.md, "Outputs and errors"):
`onnxq: error: ...` on one line, exit 2; command-line mistakes with the subcommand's usage and a
"did you mean"; ORT's and onnx.checker's messages whole on that line."""

import pytest

from onnxq import cli
from onnxq.errors import one_line
from test_bad_input import assert_clean_error


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


MISTAKES = {
    "misspelt option": (["quantize", "m.onnx", "-o", "q.onnx", "--precison", "fp8"], "quantize: unrecognized arguments: --precison fp8 (did you mean --precision?)", "usage: onnxq quantize"),
    "misspelt subcommand": (["quantise", "m.onnx"], "invalid choice: 'quantise'", "(did you mean quantize?)"),
    "misspelt choice": (["quantize", "m.onnx", "-o", "q.onnx", "--target", "tensorrtt"], "quantize: argument --target", "(did you mean tensorrt?)"),
    "missing required option": (["calibrate", "m.onnx", "--calib", "d.npz"], "calibrate: the following arguments are required: -o/--output", "usage: onnxq calibrate"),
    "nested subcommand": (["zoo", "export"], "zoo export: the following arguments are required", "usage: onnxq zoo export"),
    "bad number": (["quantize", "m.onnx", "-o", "q.onnx", "--calib-samples", "many"], "quantize: argument --calib-samples: invalid int value", "usage: onnxq quantize"),
}


@pytest.mark.parametrize("argv,needle,usage", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_command_line_mistake_names_the_subcommand_and_shows_its_usage(capsys, argv, needle, usage):
    code, err = run_main(capsys, *argv)
    assert_clean_error(code, err, needle)
    first, rest = err.split("\n", 1)
    assert first.startswith("onnxq: error:") and usage in (first + rest)
    assert "usage: onnxq [-h]" not in err or argv[0] == "quantise"  # the subcommand's usage, not the top level's


def test_no_suggestion_for_an_option_unlike_any(capsys):
    code, err = run_main(capsys, "quantize", "m.onnx", "-o", "q.onnx", "--zzzzzz")
    assert_clean_error(code, err, "unrecognized arguments: --zzzzzz")
    assert "did you mean" not in err


def test_messages_are_kept_whole_on_one_line():
    assert one_line("first line\n  second: index 3 size 4\n\n") == "first line | second: index 3 size 4"
    assert one_line(ValueError("")) == "ValueError"


def test_an_ort_load_failure_is_quoted_whole(capsys, cnn_case, tmp_path, monkeypatch):
    import onnxruntime

    model, _, evald = cnn_case

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nNode (conv1) input 'x' index 0: expected size 16, got 17")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    code, err = run_main(capsys, "check", model, model, "--data", evald, "-o", tmp_path / "b", "-q")
    assert_clean_error(code, err, "Load model failed | Node (conv1) input 'x' index 0: expected size 16, got 17")
