"""validate: the firmware self-check on target (QEMU, or a board's serial line) against the cost
model. The serial path replays a recorded QEMU report through a pseudo-terminal (no TFLM
needed); the QEMU path builds a real build folder's firmware against TFLM_DIR."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from smpq_edge.cli import main
from smpq_edge.common.errors import UserError
from smpq_edge.firmware.validate import (
    RESULT_FILE,
    Validation,
    parse_self_check,
    validate,
)
from test_firmware import QEMU_BOARD, _require_tools, require_tflm, tflm_build_dir

DATA = Path(__file__).parent / "data" / "validate_digits"
REPORT = (DATA / "selfcheck_qemu.txt").read_text()


@pytest.fixture
def build_dir(tmp_path) -> Path:
    """A build folder as `build` leaves it, from the recorded files (no TFLM, no training)."""
    out = tmp_path / "build"
    (out / "firmware").mkdir(parents=True)
    for name in ("search.json", "policy.json"):
        shutil.copy(DATA / name, out / name)
    shutil.copy(DATA / "firmware.json", out / "firmware" / "firmware.json")
    (out / "firmware" / "Makefile").write_text("APP := smpq_qemu_mps2_an386\n")
    return out


class Board:
    """A pseudo-terminal that plays a flashed board: it prints ``text`` every ``period`` s (as
    if reset in a loop), with CRLF line ends and boot noise, until stopped."""

    def __init__(self, text: str | None, period: float = 0.5):
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.text, self.period = text, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._play, daemon=True)

    def _play(self) -> None:
        while not self.stop.is_set():
            if self.text is not None:
                data = ("\x00boot noise\r\n" + self.text.replace("\n", "\r\n")).encode()
                for start in range(0, len(data), 64):  # in pieces, as a UART delivers it
                    os.write(self.master, data[start:start + 64])
                    time.sleep(0.002)
            self.stop.wait(self.period)

    def __enter__(self) -> "Board":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)


# ---- the report parser ------------------------------------------------------------------------


def test_recorded_report_parses():
    check = parse_self_check(REPORT, "recorded")
    assert check.board == QEMU_BOARD and check.vectors == 20 and check.outputs_equal == 20 and check.passed
    assert (check.arena_used, check.arena_size) == (4628, 6832)
    assert check.counter == "SysTick ticks" and check.instructions_per_tick == 40
    assert check.instructions_per_inference == 40 * check.per_inference[1] == 338960
    assert [op.op for op in check.ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "AVERAGE_POOL_2D",
                                           "FULLY_CONNECTED"]
    assert all(op.instructions == 40 * op.count for op in check.ops)


def test_report_on_hardware_counts_dwt_cycles():
    text = "\n".join([
        "smpq_edge self-check on nucleo-l4r5zi: 2 test vectors", "tensor arena: 100 of 200 bytes used",
        "outputs equal to the emulator's: 1/2", "correct labels (argmax): n/a (vectors carry no labels)",
        "DWT cycles per inference: min 10 mean 11 max 12", "per-op profile of the last inference (DWT cycles):",
        "  op  0 CONV_2D                           11", "  total                                 11", "FAIL", ""])
    check = parse_self_check(text, "board")
    assert check.counter == "DWT cycles" and check.instructions_per_inference is None and not check.passed
    assert check.ops[0].count == 11 and check.ops[0].instructions is None and check.labelled == 0


@pytest.mark.parametrize("text, message", [
    ("hello\n", "no smpq_edge self-check report"),
    (REPORT.split("per-op")[0], "ends before its PASS/FAIL line"),
    ("smpq_edge self-check on x: 3 test vectors\nPASS\n", "no line matching"),
])
def test_incomplete_report_is_a_user_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_self_check(text, "somewhere")


def test_model_init_failure_is_a_failed_check():
    check = parse_self_check("smpq_edge self-check on x: 3 test vectors\nFAIL: model_init returned 3\n", "x")
    assert not check.passed and check.outputs_equal == 0


# ---- serial: a recorded report replayed through a pseudo-terminal ------------------------------


def test_validate_over_serial_against_the_prediction(build_dir):
    with Board(REPORT) as board:
        result = validate(build_dir, port=board.path, timeout_s=20)
    assert isinstance(result, Validation) and result.passed and result.target == f"serial {board.path}"
    assert result.outputs_equal == result.vectors == 20
    search = json.loads((DATA / "search.json").read_text())["methods"][0]
    assert result.method == "smpq" and result.predicted_cycles == search["cost"]["cycles"]
    assert result.unit == "instructions" and result.measured_per_inference == 338960
    assert result.cycles_ratio == pytest.approx(338960 / search["cost"]["cycles"], abs=1e-4)
    assert result.predicted_arena == search["cost"]["arena_bytes"] and result.arena_used == 4628
    # Weighted ops line up with the cost model's layers; ops it prices only in total have none.
    by_op = [(op.op, op.layer, op.predicted_cycles) for op in result.ops]
    layers = search["cost"]["layers"]
    assert by_op == [("CONV_2D", layers[0]["name"], layers[0]["cycles"]),
                     ("DEPTHWISE_CONV_2D", layers[1]["name"], layers[1]["cycles"]),
                     ("CONV_2D", layers[2]["name"], layers[2]["cycles"]),
                     ("AVERAGE_POOL_2D", None, None),
                     ("FULLY_CONNECTED", layers[3]["name"], layers[3]["cycles"])]
    assert result.ops[0].measured == 115200
    written = json.loads((build_dir / RESULT_FILE).read_text())
    assert written["passed"] is True and written["self_check"]["instructions_per_tick"] == 40
    assert written == json.loads(json.dumps(result.to_dict()))
    assert not list(build_dir.glob(".*.tmp"))  # written atomically


def _record_ops(build_dir: Path, ops: list[tuple[str, str, int]]) -> None:
    """search.json as a build writes it now: the chosen method's cost lists every operator."""
    path = build_dir / "search.json"
    search = json.loads(path.read_text())
    search["methods"][0]["cost"]["ops"] = [{"name": n, "op": o, "kernel": "k", "cycles": c} for n, o, c in ops]
    path.write_text(json.dumps(search))


def test_every_profiled_op_against_the_recorded_operators(build_dir):
    ops = [("0", "CONV_2D", 100000), ("3", "DEPTHWISE_CONV_2D", 70000), ("6", "CONV_2D", 130000),
           ("_9", "AVERAGE_POOL_2D", 14000), ("11", "FULLY_CONNECTED", 1600)]
    _record_ops(build_dir, ops)
    with Board(REPORT) as board:
        result = validate(build_dir, port=board.path, timeout_s=20)
    assert [(op.op, op.layer, op.predicted_cycles) for op in result.ops] == [(o, n, c) for n, o, c in ops]
    assert result.ops[0].ratio == pytest.approx(115200 / 100000, abs=1e-4) and result.ops[3].ratio > 0
    assert not any("differ" in note for note in result.notes)


def test_recorded_operators_that_differ_fall_back_to_the_layers(build_dir):
    # A PAD the firmware does not run: the operator lists differ, so only the layers line up.
    _record_ops(build_dir, [("0/pad", "PAD", 5), ("0", "CONV_2D", 1), ("3", "DEPTHWISE_CONV_2D", 1),
                            ("6", "CONV_2D", 1), ("_9", "AVERAGE_POOL_2D", 1), ("11", "FULLY_CONNECTED", 1)])
    with Board(REPORT) as board:
        result = validate(build_dir, port=board.path, timeout_s=20)
    layers = json.loads((DATA / "search.json").read_text())["methods"][0]["cost"]["layers"]
    assert [op.predicted_cycles for op in result.ops] == [layers[0]["cycles"], layers[1]["cycles"],
                                                           layers[2]["cycles"], None, layers[3]["cycles"]]
    assert any("differ from search.json's operators" in note for note in result.notes)


def test_malformed_recorded_operators_are_a_user_error(build_dir):
    _record_ops(build_dir, [("0", "CONV_2D", 1)])
    search = json.loads((build_dir / "search.json").read_text())
    search["methods"][0]["cost"]["ops"][0]["cycles"] = "many"
    (build_dir / "search.json").write_text(json.dumps(search))
    with pytest.raises(UserError, match=r"search.json: not a search record this version reads "
                                        r"\(methods.0.cost.ops.0.cycles: Input should be a valid integer"):
        validate(build_dir, port="/dev/null", timeout_s=0.1)


def test_cli_validate_over_serial(build_dir, capsys):
    with Board(REPORT) as board:
        assert main(["validate", str(build_dir), "--port", board.path, "--timeout", "20"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "instructions per inference: 338,960; predicted" in out
    assert "AVERAGE_POOL_2D" in out and str(build_dir / RESULT_FILE) in out


def test_outputs_that_differ_fail_the_validation(build_dir, capsys):
    failing = REPORT.replace("outputs equal to the emulator's: 20/20", "outputs equal to the emulator's: 19/20")
    failing = failing.replace("\nPASS", "\nvector 3: output differs from the emulator's\nFAIL")
    with Board(failing) as board:
        assert main(["validate", str(build_dir), "--port", board.path, "--timeout", "20"]) == 1
    result = json.loads((build_dir / RESULT_FILE).read_text())
    assert result["passed"] is False and result["outputs_equal"] == 19
    assert any("1 of 20 outputs differ" in note for note in result["notes"])


def test_serial_timeout_and_bad_port_are_user_errors(build_dir, tmp_path, capsys):
    with Board(None) as board:
        with pytest.raises(UserError, match="no self-check report arrived .* within 0.5 s"):
            validate(build_dir, port=board.path, timeout_s=0.5)
    # Printed again and again (the port's open may drop what came before), never to the end.
    with Board(REPORT.split("per-op")[0], period=0.2) as board:
        with pytest.raises(UserError, match="the report did not finish within 1 s"):
            validate(build_dir, port=board.path, timeout_s=1)
    assert main(["validate", str(build_dir), "--port", str(tmp_path / "no-such-tty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot open serial port" in err and err.count("\n") == 1


# ---- one-line errors ----------------------------------------------------------------------------


def test_build_folder_without_firmware(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing")]) == 2
    assert "build folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no generated firmware"):
        validate(tmp_path / "empty")


def test_board_without_a_qemu_port_needs_a_serial_port(build_dir):
    record = json.loads((build_dir / "firmware" / "firmware.json").read_text())
    record.update(board="nucleo-l4r5zi", port="stm32", qemu_machine=None)
    (build_dir / "firmware" / "firmware.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="nucleo-l4r5zi has no port.qemu_machine .*--port"):
        validate(build_dir, tflm_dir=DATA)


def test_missing_tflm_dir(build_dir, monkeypatch, capsys):
    monkeypatch.delenv("TFLM_DIR", raising=False)
    with pytest.raises(UserError, match="no TFLM tree: give --tflm-dir or set TFLM_DIR"):
        validate(build_dir)
    assert main(["validate", str(build_dir), "--tflm-dir", str(build_dir)]) == 2
    assert "not a tflite-micro checkout" in capsys.readouterr().err


@pytest.fixture
def fake_tflm(tmp_path) -> Path:
    tflm = tmp_path / "tflm"
    (tflm / "tensorflow/lite/micro").mkdir(parents=True)
    (tflm / "tensorflow/lite/micro/micro_interpreter.h").write_text("")
    return tflm


def test_failed_compile(build_dir, fake_tflm, capsys):
    _require_tools("make", "arm-none-eabi-g++")
    (build_dir / "firmware" / "Makefile").write_text(
        "APP := smpq_qemu_mps2_an386\nall:\n\t@echo 'model_runner.cc:3: error: boom' >&2; exit 1\n")
    assert main(["validate", str(build_dir), "--tflm-dir", str(fake_tflm)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make failed (exit 2): model_runner.cc:3: error: boom" in err
    assert "model_runner.cc:3: error: boom" in (build_dir / "validation-make.log").read_text()


def test_qemu_timeout(build_dir, fake_tflm, monkeypatch):
    _require_tools("make", "arm-none-eabi-g++")
    (build_dir / "firmware" / "Makefile").write_text(
        "APP := smpq_qemu_mps2_an386\nall:\n\tmkdir -p $(BUILD_DIR) && touch $(BUILD_DIR)/$(APP).elf\n")
    monkeypatch.setattr("smpq_edge.firmware.validate.qemu_command",
                        lambda machine: [sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(UserError, match="did not finish within 0.5 s"):
        validate(build_dir, tflm_dir=fake_tflm, timeout_s=0.5)


# ---- the real thing: a build's firmware on QEMU ----------------------------------------------------


def test_validate_a_build_on_qemu(tmp_path, capsys):
    """`build` for qemu-mps2-an386, then `validate`: TFLM + CMSIS-NN compiled, run under QEMU,
    every output byte-equal to the emulator's, instructions and arena against the prediction."""
    _require_tools("arm-none-eabi-g++", "qemu-system-arm", "make")
    tflm = require_tflm()
    out = tmp_path / "digits"
    assert main(["build", "--board", QEMU_BOARD, "--quick", "--no-baselines", "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["validate", str(out), "--tflm-dir", tflm, "--tflm-build", str(tflm_build_dir(tmp_path / "tflm"))]
    assert main(args) == 0
    printed = capsys.readouterr().out
    print(printed)
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["passed"] and result["outputs_equal"] == result["vectors"] == 20
    assert result["unit"] == "instructions" and result["measured_per_inference"] > 0
    assert result["predicted_cycles"] > 0 and 0.2 < result["cycles_ratio"] < 5
    assert 0 < result["arena_used"] <= result["arena_size"] and result["predicted_arena"] > 0
    weighted = [op for op in result["ops"] if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert weighted and all(op["predicted_cycles"] and op["measured"] > 0 for op in weighted)
    assert "PASS on qemu-system-arm" in printed
    assert "smpq_edge self-check on qemu-mps2-an386" in (out / "validation-report.txt").read_text()
    # The generated folder stays as generated (build --resume hashes it); objects go beside it.
    listed = json.loads((out / "firmware" / "firmware.json").read_text())["files"]
    assert sorted(p.name for p in (out / "firmware").iterdir()) == sorted(listed)
    assert (out / "validation-build" / "smpq_qemu_mps2_an386.elf").is_file()
