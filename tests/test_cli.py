"""The command line, called in-process (fast) except for one run that checks the real exit path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smpq_edge.inputs.boards import board_names, load_board
from smpq_edge.cli import main
from smpq_edge.network.cost import estimate, uniform
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import load_model
from smpq_edge.inputs.policy import LayerChoice, Policy, save_policy


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """Cells of the rows between a table's dashed rule and the first blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"}) + 1
    body = []
    for line in lines[start:]:
        if not line.strip():
            break
        body.append(line.split())
    return body


def digits_graph():
    source = load_model("digits_cnn")
    return trace(source.module, source.input_shape)


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 0 and "boards" in out and "cost" in out


def test_boards_lists_every_board(capsys):
    code, out, err = run(capsys, "boards")
    assert code == 0 and err == ""
    lines = [line for line in out.splitlines()[2:] if line.strip()][:len(board_names())]
    assert [line.split()[0] for line in lines] == board_names()
    for line in lines:
        board = load_board(line.split()[0])
        b, r = board.budgets, board.reserve
        # The budgets and reserves that decide what fits, beside the board's own sizes.
        expected = (f"{board.core.value} {board.clock_mhz:g} {board.flash_kb:g} / {board.ram_kb:g} "
                    f"{b.flash_kb:g} / {b.ram_kb:g} / {b.latency_ms:g} {r.flash_kb:g} / {r.ram_kb:g} "
                    f"{board.kernels} {' '.join(board.candidates)}")
        assert " ".join(line.split()[1:]) == expected
    assert "budget: whole firmware (model + reserve)" in out


def test_boards_show_prints_json(capsys):
    code, out, err = run(capsys, "boards", "show", "nucleo-l4r5zi")
    assert code == 0 and err == ""
    shown = json.loads(out)
    assert shown == load_board("nucleo-l4r5zi").model_dump(mode="json")
    assert shown["name"] == "nucleo-l4r5zi" and shown["kernels"] == "cmsis_nn"


def test_boards_show_needs_a_name(capsys):
    code, out, err = run(capsys, "boards", "show")
    assert code == 2 and out == ""
    assert err == "error: boards show: give a board name or YAML path\n"


def test_cost_table_has_every_layer(capsys):
    code, out, err = run(capsys, "cost", "--model", "digits_cnn", "--bits", "4")
    assert code == 0 and err == ""
    rows = table_rows(out)
    graph = digits_graph()
    report = estimate(graph, uniform(graph, 4), load_board("nucleo-l4r5zi"))
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(op.name, op.kind, "4", "8") for op in graph.layers]
    assert [[int(v) for v in r[4:]] for r in rows] == [
        [l.params, l.macs, l.flash_bytes, l.scratch_bytes, l.cycles] for l in report.layers]
    summary = out.split("\n\n", 1)[1]
    assert f"model {report.model_flash_bytes} B" in summary
    assert f"arena {report.arena_bytes} B" in summary
    assert f"{report.cycles} cycles" in summary


def test_cost_json(capsys):
    code, out, err = run(capsys, "cost", "--model", "digits_cnn", "--bits", "8", "--board", "rpi-pico", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    graph = digits_graph()
    expected = estimate(graph, uniform(graph, 8), load_board("rpi-pico"))
    assert report["board"] == "rpi-pico"
    assert [layer["name"] for layer in report["layers"]] == [op.name for op in graph.layers]
    assert {layer["weight_bits"] for layer in report["layers"]} == {8}
    assert report["model_flash_bytes"] == expected.model_flash_bytes
    assert report["arena_bytes"] == expected.arena_bytes
    assert report["fits"] == {"flash": True, "ram": True, "cycles": True}


def test_cost_sizes_the_classifier_to_the_data(tmp_path, capsys):
    # Three classes instead of the digits' ten: the FC layer shrinks as it would in `search`.
    data = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((60, 1, 8, 8)).astype(np.float32), y=np.arange(60) % 3)
    fc_params = {}
    for extra in ([], ["--data", str(data)]):
        code, out, err = run(capsys, "cost", "--model", "digits_cnn", "--json", *extra)
        assert code == 0, err
        fc_params[len(extra)] = json.loads(out)["layers"][-1]["params"]
    assert fc_params[0] == 10 * fc_params[2] // 3


def test_cost_with_a_policy_file(tmp_path, capsys):
    graph = digits_graph()
    bits = [4, 8, 4, 8]
    policy = Policy(board="nucleo-l4r5zi", model="digits_cnn", method="manual", layers=[
        LayerChoice(name=op.name, kind=op.kind, weight_bits=b, params=op.weight_count)
        for op, b in zip(graph.layers, bits)])
    path = save_policy(policy, tmp_path / "policy.json")
    code, out, _ = run(capsys, "cost", "--model", "digits_cnn", "--bits", str(path), "--json")
    assert code == 0
    assert [layer["weight_bits"] for layer in json.loads(out)["layers"]] == bits


@pytest.mark.parametrize("argv,expected", [
    (["cost", "--board", "nucleo-x"], "error: unknown board 'nucleo-x'"),
    (["cost", "--model", "no_such_model"], "error: unknown model 'no_such_model'"),
    (["cost", "--bits", "missing.json"], "error: missing.json: policy file not found"),
    (["boards", "show", "nowhere.yaml"], "error: nowhere.yaml: board file not found"),
    (["cost", "--model", "net.onnx"], "error: net.onnx: "),
])
def test_user_errors_are_one_line(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(expected)


def test_subprocess_unknown_board_has_no_traceback():
    # Through `python -m`, so the real exit code and stderr are checked, not just main()'s return.
    result = subprocess.run([sys.executable, "-m", "smpq_edge", "cost", "--board", "nucleo-x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: unknown board 'nucleo-x'; known boards: ")


def test_output_into_a_closed_pipe_ends_quietly():
    """`python -m smpq_edge boards | head`: no BrokenPipeError traceback. `true` reads nothing and
    exits at once, so every write of the table meets a closed pipe (with `head` the whole table
    would fit in the pipe's buffer and nothing would break)."""
    result = subprocess.run(f"{sys.executable} -m smpq_edge boards | true", shell=True, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


@pytest.mark.parametrize("argv", [
    ["build", "--board", "no-such-board"],
    ["build", "--model", "missing.onnx"],
    ["search", "--data", "missing.npz"],
    ["cost", "--model", "no_such_model"],
    ["export", "--board", "no-such-board"],
])
def test_bad_arguments_fail_before_torch_is_imported(argv):
    """A typo costs a second, not the 10 s of importing torch and TensorFlow first."""
    code = ("import sys; from smpq_edge.cli import main; code = main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'tensorflow', 'onnx') if m in sys.modules); "
            "print('heavy:', heavy); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "heavy: []" in result.stdout


def test_cost_over_budget_exits_3(capsys):
    """Fits: 0; over a budget: 3 (with the OVER line); a bad argument: 2. The default model's int8
    is over the default board's 16 KB model flash, its int4 fits."""
    code, out, _ = run(capsys, "cost", "--bits", "8")
    assert code == 3 and "(OVER)" in out
    code, out, _ = run(capsys, "cost", "--bits", "4")
    assert code == 0 and "(OVER)" not in out
    code, out, _ = run(capsys, "cost", "--bits", "8", "--json")
    assert code == 3 and json.loads(out)["fits"]["flash"] is False


def test_help_texts_hold_no_docstring_markup(capsys):
    """Sub-command help comes from the commands' docstrings: reST's double backticks would print as they are."""
    from smpq_edge.cli import COMMANDS

    texts = []
    for argv in (["--help"], *([name, "--help"] for name in COMMANDS)):
        with pytest.raises(SystemExit):  # argparse exits after printing the help
            main(argv)
        texts.append(capsys.readouterr().out)
    assert all(texts) and not [t for t in texts if "``" in t]


def test_a_misspelt_option_shows_its_commands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--flsh-kb", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: python -m smpq_edge build") and "unrecognized arguments: --flsh-kb 3" in err
