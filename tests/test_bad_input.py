"""Bad input, driven through the real command line: every case must stop with exit code 2, exactly
one ``error: ...`` line on stderr that names the file, field or layer at fault, no traceback, and
no partial output in the output folder.

Most cases call ``smpq_edge.cli.main`` in-process (fast); a few run ``python -m smpq_edge`` in a
subprocess to prove that the real exit path prints no traceback either. Nothing here trains: the
search cases fail while loading inputs or at the budget check that precedes any training.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import yaml
from ai_edge_litert import schema_py_generated as schema

from smpq_edge.inputs.boards import BOARDS_DIR
from smpq_edge.cli import main

GOOD_BOARD = yaml.safe_load((BOARDS_DIR / "nucleo-l4r5zi.yaml").read_text())
FAST_SEARCH = ["--quick", "--no-baselines"]


# ---- helpers ----------------------------------------------------------------------------------


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *names: str) -> str:
    """Exit 2, one ``error:`` line on stderr naming each of ``names``, no traceback anywhere."""
    assert "Traceback" not in out + err
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


def snapshot(folder: Path) -> list[str] | None:
    """Every path under ``folder`` (hidden temp files included), or None when it does not exist."""
    if not folder.exists():
        return None
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_no_output(folder: Path, before: list[str] | None) -> None:
    """The folder is as it was, or (when it did not exist) absent or empty: no stray files."""
    after = snapshot(folder)
    if before is None:
        assert after in (None, []), after
    else:
        assert after == before, (before, after)


def write_board(path: Path, board: dict) -> Path:
    path.write_text(yaml.safe_dump(board, sort_keys=False))
    return path


def board_with(path: Path, dotted: str, value) -> Path:
    """The good board with one (possibly nested) field replaced."""
    board = yaml.safe_load(yaml.safe_dump(GOOD_BOARD))
    *parents, leaf = dotted.split(".")
    target = board
    for key in parents:
        target = target[key]
    target[leaf] = value
    return write_board(path, board)


def tiny_tflite(classes: int = 10, features: int = 64, shape=(1, 8, 8, 1)) -> bytes:
    """A valid int8 model built directly from the schema: NHWC input -> FULLY_CONNECTED -> logits."""
    rng = np.random.default_rng(0)

    def buffer(data: bytes | None = None):
        b = schema.BufferT()
        b.data = None if data is None else np.frombuffer(data, np.uint8).copy()
        return b

    def quant(scale: float, zero_point: int = 0):
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint = [scale], [zero_point]
        return q

    def tensor(name, dims, ttype, buffer_index, q):
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer, t.quantization = name, list(dims), ttype, buffer_index, q
        return t

    weights = rng.integers(-127, 128, size=(classes, features)).astype(np.int8)
    model = schema.ModelT()
    model.version, model.description = 3, "tiny"
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model.operatorCodes = [code]
    model.buffers = [buffer(), buffer(), buffer(weights.tobytes()), buffer(np.zeros(classes, np.int32).tobytes()),
                     buffer()]
    graph = schema.SubGraphT()
    graph.tensors = [tensor("input", shape, schema.TensorType.INT8, 1, quant(1 / 128, -128)),
                     tensor("weights", (classes, features), schema.TensorType.INT8, 2, quant(0.01)),
                     tensor("bias", (classes,), schema.TensorType.INT32, 3, quant(0.01 / 128)),
                     tensor("logits", (1, classes), schema.TensorType.INT8, 4, quant(0.1))]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    graph.operators, graph.inputs, graph.outputs = [op], [0], [3]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.fixture(scope="module")
def tflite_bytes() -> bytes:
    return tiny_tflite()


# ---- board profiles -----------------------------------------------------------------------------

BILLION_LAUGHS = "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}]\n"
    for i in range(1, 9)
)


def _yaml_text(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BOARD_CASES = {
    # id: (make the file from tmp_path, words the error line must hold besides the file name)
    "wrong type": (lambda p: board_with(p / "b.yaml", "clock_mhz", "fast"), ["clock_mhz"]),
    "bool as number": (lambda p: board_with(p / "b.yaml", "flash_kb", True), ["flash_kb"]),
    "1e300": (lambda p: board_with(p / "b.yaml", "ram_kb", 1e300), ["ram_kb"]),
    "10**30": (lambda p: board_with(p / "b.yaml", "flash_kb", 10**30), ["flash_kb"]),
    "5000-digit integer": (lambda p: _yaml_text(p, "b.yaml", "flash_kb: " + "9" * 5000 + "\n"), ["digits"]),
    "negative": (lambda p: board_with(p / "b.yaml", "reserve.ram_kb", -4), ["reserve.ram_kb"]),
    "NaN": (lambda p: _yaml_text(p, "b.yaml", yaml.safe_dump(GOOD_BOARD).replace("clock_mhz: 120", "clock_mhz: .nan")),
            ["clock_mhz", "finite"]),
    "inf": (lambda p: board_with(p / "b.yaml", "budgets.latency_ms", float("inf")), ["budgets.latency_ms", "finite"]),
    "NaN string": (lambda p: board_with(p / "b.yaml", "clock_mhz", "nan"), ["clock_mhz"]),
    "unknown key": (lambda p: board_with(p / "b.yaml", "flash_kbb", 1024), ["flash_kbb", "unknown"]),
    "unknown nested key": (lambda p: board_with(p / "b.yaml", "cycles.conv_s8.per_bit", 1.0),
                           ["cycles.conv_s8.per_bit"]),
    "budget over board": (lambda p: board_with(p / "b.yaml", "budgets.flash_kb", 4096), ["budgets.flash_kb"]),
    "name is a path": (lambda p: board_with(p / "b.yaml", "name", "../../etc/passwd"), ["name"]),
    "key given twice": (lambda p: _yaml_text(p, "b.yaml", yaml.safe_dump(GOOD_BOARD) + "fpu: false\n"),
                        ["fpu", "twice"]),
    "python tag": (lambda p: _yaml_text(p, "b.yaml", "name: !!python/object/apply:os.system ['true']\n"), ["tag"]),
    "billion laughs (unknown key)": (lambda p: _yaml_text(p, "b.yaml", BILLION_LAUGHS + yaml.safe_dump(GOOD_BOARD)),
                                     ["lol0", "unknown"]),
    "billion laughs (in a field)": (
        lambda p: _yaml_text(p, "b.yaml", BILLION_LAUGHS + "\n".join(
            line for line in yaml.safe_dump(GOOD_BOARD).splitlines() if not line.startswith(("candidates", "- w")))
            + "\ncandidates: *l8\n"), ["candidates"]),
    "deeply nested": (lambda p: _yaml_text(p, "b.yaml", "[" * 50_000 + "]" * 50_000), ["nested"]),
    "binary garbage": (lambda p: (p / "b.yaml").write_bytes(bytes(range(256)) * 8) and p / "b.yaml", ["cannot read"]),
    "empty file": (lambda p: _yaml_text(p, "b.yaml", ""), ["mapping"]),
    "a list": (lambda p: _yaml_text(p, "b.yaml", "- 1\n- 2\n"), ["mapping"]),
    "not YAML": (lambda p: _yaml_text(p, "b.yaml", "name: [unclosed\n"), ["YAML"]),
    "directory": (lambda p: (p / "dir.yaml").mkdir() or p / "dir.yaml", ["cannot read"]),
    "missing": (lambda p: p / "missing.yaml", ["not found"]),
}


@pytest.mark.parametrize("case", BOARD_CASES, ids=list(BOARD_CASES))
def test_bad_board_file(case, tmp_path, capsys):
    make, words = BOARD_CASES[case]
    path = make(tmp_path)
    assert_one_line_error(*run(capsys, "boards", "show", path), str(path), *words)


@pytest.mark.parametrize("name", ["no-such-board", "../../etc/passwd", "..", "/", "/dev/zero", "bad\nname"])
def test_bad_board_name_or_path(name, capsys):
    line = assert_one_line_error(*run(capsys, "cost", "--board", name))
    assert name.split("\n")[0] in line


# ---- model files ---------------------------------------------------------------------------------

HEADER = "import torch\nfrom torch import nn\nINPUT_SHAPE = {shape}\n"
MODEL_CASES = {
    # id: (source, words the error must hold besides the file name where the loader knows it)
    "Conv1d": (HEADER.format(shape=(1, 8, 8)) + """
class M(nn.Module):
    def __init__(self, n=10):
        super().__init__(); self.conv1d = nn.Conv1d(8, 4, 3); self.fc = nn.Linear(24, n)
    def forward(self, x):
        return self.fc(torch.flatten(self.conv1d(x.reshape(-1, 8, 8)), 1))
def build_model(num_classes=10): return M(num_classes)
""", ["conv1d", "Conv1d"]),
    "LSTM": (HEADER.format(shape=(1, 8, 8)) + """
class M(nn.Module):
    def __init__(self, n=10):
        super().__init__(); self.lstm = nn.LSTM(8, 16, batch_first=True); self.fc = nn.Linear(16, n)
    def forward(self, x):
        out, _ = self.lstm(x.reshape(-1, 8, 8))
        return self.fc(out[:, -1])
def build_model(num_classes=10): return M(num_classes)
""", ["lstm", "LSTM"]),
    "grouped conv": (HEADER.format(shape=(4, 8, 8)) + """
def build_model(num_classes=10):
    return nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 36, num_classes))
""", ["'0'", "groups=2"]),
    "Sigmoid module": (HEADER.format(shape=(1, 8, 8)) + """
def build_model(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 36, num_classes))
""", ["'1'", "Sigmoid"]),
    "sigmoid function": (HEADER.format(shape=(1, 8, 8)) + """
class M(nn.Module):
    def __init__(self, n=10):
        super().__init__(); self.conv = nn.Conv2d(1, 4, 3); self.fc = nn.Linear(4 * 36, n)
    def forward(self, x):
        return self.fc(torch.flatten(torch.sigmoid(self.conv(x)), 1))
def build_model(num_classes=10): return M(num_classes)
""", ["sigmoid"]),
    "wrong input shape": (HEADER.format(shape=(1, 8, 8)) + """
def build_model(num_classes=10): return nn.Linear(64, num_classes)
""", ["(1, 8, 8)", "mat1 and mat2"]),
    "syntax error": ("INPUT_SHAPE = (1, 8, 8)\ndef build_model(:\n    pass\n", ["model.py:2", "syntax"]),
    "build_model raises (two-line message)": (
        "INPUT_SHAPE = (1, 8, 8)\ndef build_model(num_classes=10):\n    raise RuntimeError('boom\\nsecond line')\n",
        ["model.py", "build_model", "RuntimeError: boom"]),
    "missing INPUT_SHAPE": ("from torch import nn\ndef build_model(num_classes=10):\n    return nn.Linear(64, 10)\n",
                            ["model.py", "INPUT_SHAPE"]),
    "INPUT_SHAPE not a tuple": ("INPUT_SHAPE = 5\ndef build_model(num_classes=10):\n    pass\n",
                                ["model.py", "INPUT_SHAPE"]),
    "INPUT_SHAPE negative": ("INPUT_SHAPE = (1, -8, 8)\ndef build_model(num_classes=10):\n    pass\n",
                             ["model.py", "INPUT_SHAPE"]),
    "missing build_model": ("INPUT_SHAPE = (1, 8, 8)\n", ["model.py", "build_model"]),
    "build_model returns an int": ("INPUT_SHAPE = (1, 8, 8)\ndef build_model(num_classes=10):\n    return 42\n",
                                   ["model.py", "nn.Module"]),
    "import error": ("import no_such_module_for_smpq\n", ["model.py", "no_such_module_for_smpq"]),
    "sys.exit at import": ("import sys\nsys.exit(3)\n", ["model.py", "SystemExit"]),
}


@pytest.mark.parametrize("case", MODEL_CASES, ids=list(MODEL_CASES))
def test_bad_model_file(case, tmp_path, capsys):
    source, words = MODEL_CASES[case]
    path = tmp_path / "model.py"
    path.write_text(source)
    assert_one_line_error(*run(capsys, "cost", "--model", path), *words)


def test_unknown_model_name_and_missing_file(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "cost", "--model", "no_such_example"), "no_such_example")
    assert_one_line_error(*run(capsys, "cost", "--model", tmp_path / "gone.py"), "gone.py", "not found")
    assert_one_line_error(*run(capsys, "cost", "--model", tmp_path / "gone.onnx"), "gone.onnx", "not found")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot protobuf" * 10)
    assert_one_line_error(*run(capsys, "cost", "--model", tmp_path / "junk.onnx"), "junk.onnx")


# ---- data files ----------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
X = RNG.random((60, 1, 8, 8)).astype(np.float32)
Y = np.arange(60) % 10


def _npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def _with_nan():
    x = X.copy()
    x[3, 0, 2, 2] = np.nan
    return x


DATA_CASES = {
    # id: (write the file at the path, words the error must hold besides the file name)
    "5-D x": (_npz(x=RNG.random((60, 1, 8, 8, 2)), y=Y), ["shape"]),
    "NaN in x": (_npz(x=_with_nan(), y=Y), ["NaN"]),
    "no samples": (_npz(x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)), ["no samples"]),
    "label out of range": (_npz(x=X, y=Y + 5000), ["labels"]),
    "negative label": (_npz(x=X, y=Y - 3), ["labels"]),
    "fractional label": (_npz(x=X, y=Y + 0.5), ["integer"]),
    "mismatched lengths": (_npz(x=X, y=Y[:50]), ["(50,)", "(60,)"]),
    "y as a column": (_npz(x=X, y=Y[:, None]), ["(60, 1)"]),
    # Without y the data is an autoencoder's, which the default 10-class CNN is not.
    "no y": (_npz(x=X), ["10 outputs", "64 values per sample", "autoencoder"]),
    "one class": (_npz(x=X, y=np.zeros(60, np.int64)), ["single class"]),
    "too few samples": (_npz(x=X[:2], y=Y[:2]), ["too few"]),
    "x_val without y_val": (_npz(x=X, y=Y, x_val=X[:5]), ["x_val", "y_val"]),
    "val shape differs": (_npz(x=X, y=Y, x_val=X[:5, :, :4], y_val=Y[:5]), ["shapes"]),
    "strings": (_npz(x=np.array([["a"] * 64] * 60), y=Y), ["dtype"]),
    "complex": (_npz(x=X.astype(np.complex64), y=Y), ["dtype"]),
    "bare .npy": (lambda path: Path(path).write_bytes(_npy_bytes()), ["single array"]),
    "text": (lambda path: Path(path).write_text("x,y\n1,2\n"), ["not a readable .npz"]),
    "truncated": (lambda path: Path(path).write_bytes(_npz_bytes()[:300]), ["not a readable .npz"]),
    "object array": (_npz(x=np.array([1, "a", None], dtype=object), y=Y[:3]), ["not a readable .npz"]),
    "wrong sample shape for the model": (_npz(x=RNG.random((60, 1, 6, 6)).astype(np.float32), y=Y),
                                         ["(1, 6, 6)", "(1, 8, 8)"]),
}


def _npy_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, X)
    return buffer.getvalue()


def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x=X, y=Y)
    return buffer.getvalue()


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_file(case, tmp_path, capsys):
    write, words = DATA_CASES[case]
    path = tmp_path / "data.npz"
    write(path)
    out = tmp_path / "out"
    line = assert_one_line_error(*run(capsys, "search", "--data", path, "--out", out, *FAST_SEARCH), *words)
    assert "data" in line  # the file (data.npz) or, for a shape clash, the data set (data)
    assert_no_output(out, None)


def test_unknown_data_name_and_non_npz(tmp_path, capsys):
    out = tmp_path / "out"
    assert_one_line_error(*run(capsys, "search", "--data", "no-such-data", "--out", out, *FAST_SEARCH),
                          "no-such-data")
    csv = tmp_path / "data.csv"
    csv.write_text("1,2,3\n")
    assert_one_line_error(*run(capsys, "search", "--data", csv, "--out", out, *FAST_SEARCH), "data.csv")
    assert_no_output(out, None)


# ---- .tflite files: emulate and firmware -------------------------------------------------------

TFLITE_CASES = {
    "truncated to half": (lambda good: good[: len(good) // 2], ["corrupt"]),
    "truncated to 40 bytes": (lambda good: good[:40], ["corrupt"]),
    "every 7th byte flipped": (lambda good: bytes(b ^ 0xFF if i >= 8 and i % 7 == 0 else b for i, b in enumerate(good)),
                               ["corrupt"]),
    "random bytes with the identifier": (lambda good: b"\x10\x00\x00\x00TFL3" + bytes(RNG.integers(0, 256, 400,
                                                                                                  np.uint8)),
                                         ["TFL"]),
    "a PNG": (lambda good: b"\x89PNG\r\n\x1a\n" + bytes(64), ["TFL3"]),
    "empty": (lambda good: b"", ["TFL3"]),
    "text": (lambda good: b"hello, not a model\n", ["TFL3"]),
}


def _tflite_case_file(case: str, tmp_path: Path, tflite_bytes: bytes) -> Path:
    path = tmp_path / "model.tflite"
    path.write_bytes(TFLITE_CASES[case][0](tflite_bytes))
    return path


@pytest.mark.parametrize("case", TFLITE_CASES, ids=list(TFLITE_CASES))
def test_bad_tflite_to_emulate(case, tmp_path, capsys, tflite_bytes):
    path = _tflite_case_file(case, tmp_path, tflite_bytes)
    before = snapshot(tmp_path)
    assert_one_line_error(*run(capsys, "emulate", path), str(path), *TFLITE_CASES[case][1])
    assert_no_output(tmp_path, before)  # no emulation_model.json beside the model


@pytest.mark.parametrize("case", TFLITE_CASES, ids=list(TFLITE_CASES))
def test_bad_tflite_to_firmware(case, tmp_path, capsys, tflite_bytes):
    path = _tflite_case_file(case, tmp_path, tflite_bytes)
    out = tmp_path / "fw"
    assert_one_line_error(*run(capsys, "firmware", path, "--out", out), str(path), *TFLITE_CASES[case][1])
    assert_no_output(out, None)


def test_emulate_and_firmware_refuse_data_of_the_wrong_shape(tmp_path, capsys, tflite_bytes):
    model = tmp_path / "model.tflite"
    model.write_bytes(tflite_bytes)
    data = tmp_path / "data.npz"
    np.savez(data, x=RNG.random((60, 1, 6, 6)).astype(np.float32), y=Y)
    before = snapshot(tmp_path)
    # Both commands quantise data with the same function, so they name the same two shapes.
    assert_one_line_error(*run(capsys, "emulate", model, "--data", data), str(model), "(1, 6, 6)", "(8, 8, 1)")
    out = tmp_path / "fw"
    assert_one_line_error(*run(capsys, "firmware", model, "--out", out, "--data", data), "model.tflite",
                          "(1, 6, 6)", "(8, 8, 1)")
    assert_no_output(tmp_path, before)


def test_missing_and_directory_tflite(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "emulate", tmp_path / "gone.tflite"), "gone.tflite")
    assert_one_line_error(*run(capsys, "emulate", tmp_path), str(tmp_path))
    assert_one_line_error(*run(capsys, "firmware", tmp_path, "--out", tmp_path / "fw"), str(tmp_path))
    assert_no_output(tmp_path / "fw", None)


def test_firmware_option_values(tmp_path, capsys, tflite_bytes):
    model = tmp_path / "model.tflite"
    model.write_bytes(tflite_bytes)
    out = tmp_path / "fw"
    assert_one_line_error(*run(capsys, "firmware", model, "--out", out, "--vectors", "-3"), "vectors")
    assert_one_line_error(*run(capsys, "firmware", model, "--out", out, "--margin", "-3000"), "margin")
    assert_no_output(out, None)


# ---- budgets -------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Any training step fails the test: budget errors must come before the first epoch."""
    import smpq_edge.search.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the budget check")

    monkeypatch.setattr(runner, "train", refuse)


@pytest.mark.parametrize("option, value, dimension", [
    ("--flash-kb", "1", "flash"),
    ("--ram-kb", "1", "RAM"),
    ("--latency-ms", "0.001", "latency"),
])
def test_budget_no_policy_can_meet(option, value, dimension, tmp_path, capsys, no_training):
    out = tmp_path / "out"
    line = assert_one_line_error(*run(capsys, "search", option, value, "--out", out, *FAST_SEARCH),
                                 "smallest achievable", dimension)
    # Whole-firmware figures in the budget's own units, never a negative budget.
    assert not re.search(r"-\d", line.split("smallest achievable")[1]), line
    figures = dict(part.split(" ", 1) for part in line.split("smallest achievable: ")[1].split(" (whole")[0]
                   .split(", "))
    assert set(figures) == {"flash", "RAM", "latency"}
    assert float(figures["flash"].split()[0]) > 0 and float(figures["RAM"].split()[0]) > 0
    assert_no_output(out, None)


@pytest.mark.parametrize("option, value", [
    ("--flash-kb", "-5"), ("--ram-kb", "0"), ("--latency-ms", "-1"), ("--flash-kb", "nan"), ("--flash-kb", "inf"),
    ("--ram-kb", "1e300"),
])
def test_budget_option_out_of_range(option, value, tmp_path, capsys, no_training):
    out = tmp_path / "out"
    assert_one_line_error(*run(capsys, "search", option, value, "--out", out, *FAST_SEARCH), option)
    assert_no_output(out, None)


@pytest.mark.parametrize("command", ["search", "build"])
@pytest.mark.parametrize("model, data, expected", [
    ("resnet8", "digits", "model resnet8 expects input (3, 32, 32), data digits has (1, 8, 8)"),
    ("dscnn_kws", "digits", "model dscnn_kws expects input (1, 49, 10), data digits has (1, 8, 8)"),
])
def test_data_the_model_does_not_take(command, model, data, expected, tmp_path, capsys, no_training):
    # Not torch's text from the first layer that fails ("expected input[1, 1, 8, 8] to have 3 channels").
    code, out, err = run(capsys, command, "--model", model, "--data", data, "--out", tmp_path / "out", "--quick")
    assert (code, err) == (2, f"error: {expected}\n")


def test_build_budget_error_leaves_the_folder_empty(tmp_path, capsys, no_training):
    out = tmp_path / "build"
    assert_one_line_error(*run(capsys, "build", "--flash-kb", "1", "--out", out, "--quick"), "smallest achievable")
    assert_no_output(out, None)


# ---- output folders ----------------------------------------------------------------------------


def test_output_folder_under_a_file(tmp_path, capsys, tflite_bytes, no_training):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder\n")
    model = tmp_path / "model.tflite"
    model.write_bytes(tflite_bytes)
    before = snapshot(tmp_path)
    assert_one_line_error(*run(capsys, "search", "--out", afile / "out", *FAST_SEARCH), str(afile / "out"))
    assert_one_line_error(*run(capsys, "search", "--out", afile, *FAST_SEARCH), str(afile))
    assert_one_line_error(*run(capsys, "firmware", model, "--out", afile / "out"), str(afile / "out"))
    assert_no_output(tmp_path, before)
    assert afile.read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("folder", ["/proc/smpq_edge_out", "/proc/self/status/out"])
def test_output_folder_in_proc(folder, tmp_path, capsys, tflite_bytes):
    model = tmp_path / "model.tflite"
    model.write_bytes(tflite_bytes)
    assert_one_line_error(*run(capsys, "firmware", model, "--out", folder), folder)
    assert not Path(folder).exists()


# ---- policy files for cost --bits ---------------------------------------------------------------

POLICY_CASES = {
    "bits 9": ('{"board": "b", "model": "m", "layers": [{"name": "0", "kind": "conv", "weight_bits": 9, '
               '"params": 1}]}', ["layers.0.weight_bits"]),
    "not JSON": ("{bad", ["JSON"]),
    "a list": ("[]", ["top level"]),
    "no layers": ('{"board": "b", "model": "m", "layers": []}', ["layers"]),
    "unknown layer": ('{"board": "b", "model": "m", "layers": [{"name": "nope", "kind": "conv", "weight_bits": 4, '
                      '"params": 1}]}', ["nope"]),
    "missing layers": ('{"board": "b", "model": "m", "layers": [{"name": "0", "kind": "conv", "weight_bits": 4, '
                       '"params": 1}]}', ["missing layers"]),
    "unknown field": ('{"board": "b", "model": "m", "bits": 4, "layers": [{"name": "0", "kind": "conv", '
                      '"weight_bits": 4, "params": 1}]}', ["bits"]),
    "layer twice": ('{"board": "b", "model": "m", "layers": [' + ", ".join(
        ['{"name": "0", "kind": "conv", "weight_bits": 4, "params": 1}'] * 2) + "]}", ["twice"]),
    "binary": (b"\xff\xfe\x00garbage", ["JSON"]),
}


@pytest.mark.parametrize("case", POLICY_CASES, ids=list(POLICY_CASES))
def test_bad_policy_file(case, tmp_path, capsys):
    content, words = POLICY_CASES[case]
    path = tmp_path / "policy.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_line_error(*run(capsys, "cost", "--bits", path), str(path), *words)


@pytest.mark.parametrize("bits", ["3", "16", "int4", ""])
def test_bad_bits_value(bits, capsys):
    assert_one_line_error(*run(capsys, "cost", "--bits", bits), "--bits")


def test_policy_bits_not_on_the_board(tmp_path, capsys):
    board = board_with(tmp_path / "int8-only.yaml", "candidates", ["w8a8"])
    policy = tmp_path / "policy.json"
    layers = [{"name": n, "kind": k, "weight_bits": 4, "params": 1}
              for n, k in [("conv0", "conv"), ("depthwise3", "depthwise"), ("conv6", "conv"), ("fc11", "fc")]]
    policy.write_text(json.dumps({"board": "b", "model": "m", "layers": layers}))
    assert_one_line_error(*run(capsys, "cost", "--model", "digits_cnn", "--board", board, "--bits", policy), str(policy),
                          "layer 'conv0'")


# ---- the real exit path, in a subprocess ---------------------------------------------------------


def _subprocess(tmp_path: Path, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smpq_edge", *map(str, argv)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("case", ["deeply nested board", "model whose build_model raises", "truncated tflite"])
def test_subprocess_exit_path(case, tmp_path, tflite_bytes):
    if case == "deeply nested board":
        path = _yaml_text(tmp_path, "deep.yaml", "{a: " * 20_000 + "1" + "}" * 20_000)
        result = _subprocess(tmp_path, "boards", "show", path)
    elif case == "model whose build_model raises":
        path = tmp_path / "model.py"
        path.write_text(MODEL_CASES["build_model raises (two-line message)"][0])
        result = _subprocess(tmp_path, "cost", "--model", path)
    else:
        path = tmp_path / "model.tflite"
        path.write_bytes(tflite_bytes[: len(tflite_bytes) // 2])
        result = _subprocess(tmp_path, "firmware", path, "--out", tmp_path / "fw")
        assert_no_output(tmp_path / "fw", None)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
