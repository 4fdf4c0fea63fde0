"""Board profiles: every built-in board parses, and each kind of bad YAML stops with one line that
names the file and the field (a silently accepted typo would give firmware that does not fit)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smpq_edge.inputs.boards import BOARDS_DIR, KERNEL_VARIANTS, Board, Core, board_names, load_board, parse_board
from smpq_edge.common.errors import UserError

BOARDS_DOC = Path(__file__).resolve().parent.parent / "docs" / "boards.md"
VALID = "nucleo-l4r5zi"


def valid_board() -> dict:
    return yaml.safe_load((BOARDS_DIR / f"{VALID}.yaml").read_text(encoding="utf-8"))


def test_registry_is_not_empty():
    # Guards the parametrisations below: an empty glob would make them pass vacuously.
    assert len(board_names()) >= 7
    assert VALID in board_names() and "rpi-pico" in board_names()


@pytest.mark.parametrize("name", board_names())
def test_builtin_board_parses(name):
    board = load_board(name)
    assert board.name == name, "a board's name field must match its file name"
    # The parsed profile leaves room for a model on every axis.
    assert board.model_flash_budget_bytes > 0
    assert board.model_ram_budget_bytes > 0
    assert board.cycle_budget > 0
    assert set(board.weight_bits) <= {4, 8}
    assert load_board(BOARDS_DIR / f"{name}.yaml") == board, "by path and by name must agree"


@pytest.mark.parametrize("name", board_names())
def test_board_cycles_name_their_source(name):
    # The figures come from bench/cycles.py's fit to QEMU instruction counts; a core QEMU does not
    # emulate (anything but the M4 of mps2-an386) says how its figures were derived from them.
    board = load_board(name)
    text = (BOARDS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    cycles = text[text.index("\ncycles:"):]
    assert "bench/cycles.py" in cycles and "QEMU" in cycles
    assert set(board.cycles) == set(KERNEL_VARIANTS[board.kernels])
    if board.core != Core.cortex_m4:
        assert "derived" in cycles


def test_board_properties_from_known_figures():
    pico = load_board("rpi-pico")
    assert pico.kernels == "reference" and not pico.has_dwt
    l4 = load_board(VALID)
    assert l4.has_dwt
    assert l4.model_flash_budget_bytes == (2048 - 96) * 1024
    assert l4.model_ram_budget_bytes == (640 - 24) * 1024
    assert l4.cycle_budget == 120_000_000  # 1000 ms at 120 MHz


def _set(path: str, value):
    def mutate(board: dict) -> dict:
        *parents, leaf = path.split(".")
        node = board
        for key in parents:
            node = node[key]
        node[leaf] = value
        return board

    return mutate


def _delete(path: str):
    def mutate(board: dict) -> dict:
        *parents, leaf = path.split(".")
        node = board
        for key in parents:
            node = node[key]
        del node[leaf]
        return board

    return mutate


# (id, mutation of a valid board dict, text the one-line message must contain besides the file name)
BAD_BOARDS = [
    ("unknown-key", _set("flash_kbb", 2048), "flash_kbb: unknown field"),
    ("unknown-nested-key", _set("budgets.ram_kbb", 100), "budgets.ram_kbb: unknown field"),
    ("wrong-type-number", _set("clock_mhz", "fast"), "clock_mhz"),
    ("wrong-type-bool-as-number", _set("flash_kb", True), "flash_kb"),
    ("wrong-type-bool", _set("fpu", "maybe"), "fpu"),
    ("wrong-type-section", _set("reserve", 96), "reserve"),
    ("negative-size", _set("ram_kb", -640), "ram_kb"),
    ("zero-clock", _set("clock_mhz", 0), "clock_mhz"),
    ("absurd-size-bytes-as-kb", _set("flash_kb", 2 * 1024 * 1024), "flash_kb"),
    ("absurd-clock-hz-as-mhz", _set("clock_mhz", 120_000_000), "clock_mhz"),
    ("flash-budget-over-board", _set("budgets.flash_kb", 4096), "budgets.flash_kb"),
    ("ram-budget-over-board", _set("budgets.ram_kb", 1000), "budgets.ram_kb"),
    ("reserve-eats-flash-budget", _set("reserve.flash_kb", 2048), "reserve.flash_kb"),
    ("reserve-eats-ram-budget", _set("reserve.ram_kb", 700), "reserve.ram_kb"),
    ("unknown-core", _set("core", "cortex-m99"), "core"),
    ("unknown-kernels", _set("kernels", "tflm-fast"), "kernels"),
    # Unhashable values once crashed the kernel-variant lookup with a traceback (Hypothesis found them).
    ("kernels-as-list", _set("kernels", []), "kernels"),
    ("kernels-as-mapping", _set("kernels", {"a": 1}), "kernels"),
    ("unknown-candidate", _set("candidates", ["w2a4", "w8a8"]), "candidates: w2a4: TFLM has no 4-bit activations"),
    ("int16-activation-candidate", _set("candidates", ["w4a16"]), "candidates: w4a16: TFLM's 16x8 kernels take int8 weights only"),
    ("too-narrow-candidate", _set("candidates", ["w1a8"]), "candidates: w1a8: TFLM runs weights of 2 to 8 bits"),
    ("duplicated-candidate", _set("candidates", ["w4a8", "w4a8"]), "candidates"),
    ("no-candidates", _set("candidates", []), "candidates"),
    ("missing-field", _delete("cycles"), "cycles"),
    ("missing-nested-field", _delete("budgets.flash_kb"), "budgets.flash_kb"),
    ("missing-kernel-variant", _delete("cycles.conv_1x1_s4"), "cycles: no formula for kernel variant conv_1x1_s4"),
    ("unknown-kernel-variant", _set("cycles.conv_3x3_s8", {"per_mac": 1.0}),
     "cycles.conv_3x3_s8: not a kernel variant of cmsis_nn kernels"),
    ("variant-of-the-other-kernel-set", lambda b: {**b, "kernels": "reference"}, "not a kernel variant of reference"),
    ("unknown-cycle-term", _set("cycles.fc_s8.per_flop", 1.0), "cycles.fc_s8.per_flop: unknown field"),
    ("cycle-term-as-string", _set("cycles.fc_s8.per_mac", "2"), "cycles.fc_s8.per_mac"),
    ("missing-budget", _delete("budgets.latency_ms"), "budgets.latency_ms"),
    ("bad-name", _set("name", "My Board"), "name"),
    ("dsp-on-m0plus", lambda b: {**b, "core": "cortex-m0plus", "dsp": True}, "dsp"),
    ("negative-cycles", _set("cycles.fc_s8.per_mac", -3.0), "cycles.fc_s8.per_mac"),
]


@pytest.mark.parametrize("mutate,expected", [pytest.param(m, e, id=i) for i, m, e in BAD_BOARDS])
def test_bad_board_names_file_and_field(tmp_path, mutate, expected):
    assert_one_line_error(tmp_path, yaml.safe_dump(mutate(valid_board())), expected)


def assert_one_line_error(tmp_path, text: str, expected: str) -> None:
    """Loading ``text`` as a board fails with one line that starts with the file and says ``expected``."""
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_board(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


# Raw texts: what a dict cannot express (syntax, top-level type, repeated keys).
BAD_TEXTS = [
    ("invalid-yaml-syntax", "name: nucleo\ncore: [cortex-m4\n", "not valid YAML at line"),
    ("not-a-mapping", "- nucleo-l4r5zi\n- cortex-m4\n", "expected a mapping"),
    ("empty-file", "", "expected a mapping"),
    ("tab-indentation", "reserve:\n\tflash_kb: 96\n", "not valid YAML"),
    ("python-tag", "name: !!python/object/apply:os.getcwd []\n", "line 1"),
]


@pytest.mark.parametrize("text,expected", [pytest.param(t, e, id=i) for i, t, e in BAD_TEXTS])
def test_bad_board_text(tmp_path, text, expected):
    assert_one_line_error(tmp_path, text, expected)


def test_repeated_key_is_refused(tmp_path):
    # PyYAML alone keeps the last value, so an edited copy of a line would silently win.
    text = (BOARDS_DIR / f"{VALID}.yaml").read_text(encoding="utf-8") + "flash_kb: 1024\n"
    with pytest.raises(UserError, match=r"field 'flash_kb' given twice at line \d+"):
        parse_board(text, "dup.yaml")


def test_merge_keys_still_work():
    # The repeated-key check must not break YAML anchors, which users share between sections.
    board = valid_board()
    text = yaml.safe_dump({k: v for k, v in board.items() if k not in ("budgets", "reserve")})
    text += "reserve: &r {flash_kb: 96, ram_kb: 24}\nbudgets: {<<: *r, flash_kb: 1024, ram_kb: 256, latency_ms: 5}\n"
    parsed = parse_board(text, "merge.yaml")
    assert (parsed.budgets.flash_kb, parsed.budgets.ram_kb, parsed.reserve.flash_kb) == (1024, 256, 96)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(UserError) as info:
        load_board(path)
    assert str(info.value) == f"{path}: board file not found"


def test_unknown_board_name_lists_the_known_ones():
    with pytest.raises(UserError) as info:
        load_board("nucleo-x")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown board 'nucleo-x'" in message
    assert all(name in message for name in board_names())


def test_cli_bad_board_is_one_line_without_traceback(tmp_path):
    board = valid_board()
    board["flash_kbb"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(board), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "smpq_edge", "boards", "show", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {path}: flash_kbb: unknown field"]


# --- docs/boards.md: the example board and the boards table must stay true ---------------------

def _doc_section(title: str) -> str:
    text = BOARDS_DOC.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/boards.md has no '## {title}' section"
    return match.group(1)


def test_doc_example_board_is_complete_and_valid():
    blocks = re.findall(r"```yaml\n(.*?)```", _doc_section("Adding a board"), flags=re.S)
    assert len(blocks) == 1, "the 'Adding a board' section must hold exactly one yaml block"
    board = parse_board(blocks[0], "docs/boards.md")
    assert isinstance(board, Board)
    # Complete: it shows every field a user can set, optional ones included.
    assert set(yaml.safe_load(blocks[0])) == set(Board.model_fields)


@pytest.mark.parametrize("name", board_names())
def test_doc_boards_table_lists_board(name):
    board = load_board(name)
    rows = [line for line in _doc_section("Built-in boards").splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"add a row for {name} to the boards table in docs/boards.md"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1:6] == [board.core.value, f"{board.clock_mhz:g} MHz", f"{board.flash_kb:g} KB",
                          f"{board.ram_kb:g} KB", board.kernels]


def test_unmutated_dump_parses():
    # The bad cases are only meaningful if the dump of the untouched dict is a valid board.
    assert parse_board(yaml.safe_dump(valid_board()), "ok.yaml") == load_board(VALID)


def test_unhashable_kernels_is_one_line_and_exit_2(tmp_path, capsys):
    from smpq_edge.cli import main

    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump({**valid_board(), "kernels": ["cmsis_nn"]}), encoding="utf-8")
    assert main(["boards", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: kernels") and "\n" not in err
