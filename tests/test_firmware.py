"""Firmware generation: model array, resolver, arena, test vectors, determinism, compilation,
and (with a TFLM tree in TFLM_DIR) the self-check built for and run under QEMU mps2-an386."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from smpq_edge.inputs.boards import BOARDS_DIR, board_names, load_board
from smpq_edge.cli import main
from smpq_edge.inputs.data import load_dataset
from smpq_edge.common.errors import UserError
from smpq_edge.export.int4 import pack_int4
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.firmware.kernels import ADD_METHODS, OpUse, kernel_files, registrations
from smpq_edge.firmware.render import default_arena_margin, generate_firmware, render_firmware
from smpq_edge.firmware.spec import build_spec, build_test_vectors
from smpq_edge.firmware.templates import BYTES_PER_LINE, FIRMWARE_DIR, FileTemplate, c_float, c_identifier, c_string, fill_template
from smpq_edge.network.softmax import BETA, OUTPUT_SCALE, OUTPUT_ZERO_POINT
from smpq_edge.tflite.tflm import TensorSpec, TflmRunner, quantise_input, smallest_arena

VECTORS = 12
QEMU_BOARD = "qemu-mps2-an386"
REFERENCE_BOARD = "rpi-pico"  # kernels: reference
PLAIN_CXX = ["model_data.cc", "test_vectors.cc"]  # generated files that need no TFLM headers
PLAIN_C = ["smpq_timer.c", "startup_cortex_m.c"]
C_HEADERS = ["model_data.h", "test_vectors.h", "model_runner.h", "smpq_timer.h"]


# ---- fixtures: a small trained digits CNN, full int8, and INT4 rewrites of it ---------------


def _keras_digits_int8() -> bytes:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    digits = load_dataset("digits", seed=0)
    x = digits.x_train.transpose(0, 2, 3, 1)  # NHWC for Keras
    inputs = tf.keras.Input((8, 8, 1), batch_size=None)
    h = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = tf.keras.layers.Conv2D(16, 1, activation="relu")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    outputs = tf.keras.layers.Dense(10)(h)
    model = tf.keras.Model(inputs, outputs)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.02),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, digits.y_train, epochs=30, batch_size=64, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s[None]] for s in x[:64])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _to_int4(model_bytes: bytes, op_indices: list[int]) -> bytes:
    """Rewrite the filters of the given conv/depthwise ops as INT4 (per channel) and requantise
    their biases, as the exporter does; the TFLM interpreter then runs the INT4 kernels."""
    model = TfliteModel.from_bytes(model_bytes)
    ops = model.operators()
    for index in op_indices:
        op = ops[index]
        activation, weights, bias = (model.tensor(i) for i in op.inputs[:3])
        axis = weights.quantization.quantized_dimension
        q8 = np.frombuffer(weights.data, np.int8).reshape(weights.shape)
        shape = [1] * q8.ndim
        shape[axis] = -1
        real = q8 * np.asarray(weights.quantization.scales).reshape(shape)
        scale4 = np.maximum(np.abs(real).max(axis=tuple(a for a in range(q8.ndim) if a != axis)), 1e-12) / 7
        q4 = np.clip(np.round(real / scale4.reshape(shape)), -8, 7).astype(np.int8)
        model.set_tensor_type(weights.index, "INT4")
        model.set_tensor_data(weights.index, pack_int4(q4))
        model.set_tensor_quantization(weights.index, scale4.tolist(), [0] * len(scale4), axis)
        bias_real = np.frombuffer(bias.data, np.int32) * activation.quantization.scales[0] * np.asarray(
            weights.quantization.scales)
        bias_scale = activation.quantization.scales[0] * scale4
        model.set_tensor_data(bias.index, np.round(bias_real / bias_scale).astype(np.int32).tobytes())
        model.set_tensor_quantization(bias.index, bias_scale.tolist(), [0] * len(bias_scale), 0)
    return model.to_bytes()


@pytest.fixture(scope="session")
def int8_model() -> bytes:
    return _keras_digits_int8()


@pytest.fixture(scope="session")
def int4_model(int8_model) -> bytes:
    return _to_int4(int8_model, [0, 1, 2])  # conv, depthwise, pointwise conv


@pytest.fixture(scope="session")
def mixed_model(int8_model) -> bytes:
    return _to_int4(int8_model, [0])  # first conv INT4, pointwise conv INT8


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def int8_spec(int8_model, digits):
    vectors = build_test_vectors(int8_model, digits.x_test, digits.y_test, count=VECTORS, origin="digits test split")
    return build_spec(int8_model, vectors, name="digits int8.tflite")


@pytest.fixture(scope="session")
def int8_firmware(int8_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("fw_int8")
    return generate_firmware(int8_spec, load_board(QEMU_BOARD), out)


def _spec_without_measuring(model_bytes: bytes, count: int = 3):
    return build_spec(model_bytes, build_test_vectors(model_bytes, count=count), arena_bytes=4096)


# ---- parsing helpers for the generated C -----------------------------------------------------


def _c_array(text: str, name: str) -> list[int]:
    match = re.search(rf"{re.escape(name)}\[[^=]*=\s*\{{(.*?)\n\}};", text, re.S)
    assert match, f"no array {name}"
    body = re.sub(r"//[^\n]*", "", match.group(1))
    return [int(tok, 0) for tok in re.findall(r"-?0x[0-9a-f]+|-?\d+", body)]


def _resolver_calls(text: str) -> list[str]:
    return re.findall(r"resolver\.(Add\w+)\(", text)


# ---- model array ----------------------------------------------------------------------------


def test_model_array_equals_the_tflite(int8_firmware, int8_model):
    text = (int8_firmware.out_dir / "model_data.cc").read_text()
    assert bytes(_c_array(text, "g_model_data")) == int8_model
    assert "alignas(16) const unsigned char g_model_data[SMPQ_MODEL_DATA_LEN]" in text
    header = (int8_firmware.out_dir / "model_data.h").read_text()
    assert f"#define SMPQ_MODEL_DATA_LEN {len(int8_model)}u" in header
    assert "#ifndef SMPQ_MODEL_DATA_H_" in header and header.rstrip().endswith("#endif  // SMPQ_MODEL_DATA_H_")
    rows = [line for line in text.splitlines() if line.startswith("  0x")]
    assert all(line.count("0x") == BYTES_PER_LINE for line in rows[:-1])
    assert 1 <= rows[-1].count("0x") <= BYTES_PER_LINE


# ---- resolver -------------------------------------------------------------------------------


def test_resolver_lists_exactly_the_models_ops(int8_firmware, int8_model):
    text = (int8_firmware.out_dir / "model_runner.cc").read_text()
    model_ops = list(dict.fromkeys(op.name for op in TfliteModel.from_bytes(int8_model).operators()))
    assert model_ops == ["CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED"]
    assert _resolver_calls(text) == [ADD_METHODS[op] for op in model_ops]
    count = int(re.search(r"constexpr unsigned int kOpCount = (\d+);", text).group(1))
    assert count == len(model_ops)
    assert "tflite::MicroMutableOpResolver<kOpCount>" in text
    # int8 weights on a CMSIS-NN board: the INT8-only kernel variants.
    assert "resolver.AddConv2D(tflite::Register_CONV_2D_INT8())" in text
    assert "resolver.AddDepthwiseConv2D(tflite::Register_DEPTHWISE_CONV_2D_INT8())" in text
    assert "resolver.AddFullyConnected(tflite::Register_FULLY_CONNECTED_INT8())" in text
    assert "resolver.AddMean()" in text


def test_int4_weights_get_the_int4_variants_on_cmsis_nn_only(int4_model):
    spec = _spec_without_measuring(int4_model)
    cmsis = {r.op: r.call for r in render_firmware(spec, load_board(QEMU_BOARD))[1].registrations}
    assert cmsis == {
        "CONV_2D": "resolver.AddConv2D(tflite::Register_CONV_2D_INT4())",
        "DEPTHWISE_CONV_2D": "resolver.AddDepthwiseConv2D(tflite::Register_DEPTHWISE_CONV_2D_INT4())",
        "MEAN": "resolver.AddMean()",
        "FULLY_CONNECTED": "resolver.AddFullyConnected(tflite::Register_FULLY_CONNECTED_INT8())",
    }
    files, result = render_firmware(spec, load_board(REFERENCE_BOARD))
    assert [r.call for r in result.registrations] == [
        "resolver.AddConv2D()", "resolver.AddDepthwiseConv2D()", "resolver.AddMean()", "resolver.AddFullyConnected()",
    ]
    assert "Register_" not in files["model_runner.cc"].split("TfLiteStatus RegisterOps")[1].split("return kTfLiteOk")[0]


def test_mixed_int4_int8_instances_of_one_op_use_the_generic_kernel(mixed_model):
    spec = _spec_without_measuring(mixed_model)
    conv = next(use for use in spec.ops if use.name == "CONV_2D")
    assert conv.count == 2 and set(conv.weight_types) == {"INT4", "INT8"}
    regs = {r.op: r for r in render_firmware(spec, load_board(QEMU_BOARD))[1].registrations}
    assert regs["CONV_2D"].call == "resolver.AddConv2D()"
    assert "mix" in regs["CONV_2D"].reason
    assert regs["DEPTHWISE_CONV_2D"].registration == "Register_DEPTHWISE_CONV_2D_INT8"


def test_registration_rules_without_a_model():
    int16 = OpUse("FULLY_CONNECTED", 1, ("INT16",), ("INT8",))
    assert registrations((int16,), "cmsis_nn")[0].registration is None
    with pytest.raises(UserError, match="CUSTOM:my_op"):
        registrations((OpUse("CUSTOM:my_op", 1, ("INT8",), ()),), "cmsis_nn")
    with pytest.raises(UserError, match="NOT_AN_OP"):
        registrations((OpUse("NOT_AN_OP", 1, ("INT8",), ()),), "reference")


# ---- arena ----------------------------------------------------------------------------------


def test_arena_constant_is_the_measurement_plus_the_margin(int8_firmware, int8_spec, int8_model):
    measured = smallest_arena(int8_model)
    assert int8_spec.arena_bytes == measured
    runner = (int8_firmware.out_dir / "model_runner.cc").read_text()
    size = int(re.search(r"constexpr size_t kArenaSize = (\d+);", runner).group(1))
    assert size == measured + default_arena_margin(measured) == int8_firmware.arena_size
    assert size % 16 == 0
    assert f"{measured} bytes (measured with the TFLM host interpreter" in runner
    assert "alignas(16) static uint8_t tensor_arena[kArenaSize];" in runner
    header = (int8_firmware.out_dir / "model_runner.h").read_text()
    assert f"#define SMPQ_TENSOR_ARENA_SIZE {size}" in header
    readme = (int8_firmware.out_dir / "README.md").read_text()
    assert f"**{size} bytes** = {measured} bytes (measured with the TFLM host interpreter" in readme
    # An explicit margin is used as given (rounded up to the arena alignment).
    _, result = render_firmware(int8_spec, load_board(QEMU_BOARD), margin=100)
    assert result.arena_size == -(-(measured + 100) // 16) * 16
    with pytest.raises(UserError):
        render_firmware(int8_spec, load_board(QEMU_BOARD), margin=-1)


def test_default_margin():
    assert default_arena_margin(96) == 1024
    assert default_arena_margin(100) == 1036  # 1024, then up to a 16-byte aligned arena
    assert default_arena_margin(40_000) == 10_000
    assert (40_001 + default_arena_margin(40_001)) % 16 == 0 and default_arena_margin(40_001) >= 10_000.25


# ---- test vectors ---------------------------------------------------------------------------


def test_embedded_vectors_equal_the_tflm_interpreters(int8_firmware, int8_model, digits):
    text = (int8_firmware.out_dir / "test_vectors.cc").read_text()
    runner = TflmRunner(int8_model)
    # Quantised exactly as the emulate stage feeds TFLM: round(x / scale) + zero point, channels last.
    inputs = quantise_input(digits.x_test[:VECTORS], runner.input)
    reference = np.round(digits.x_test[:VECTORS].transpose(0, 2, 3, 1) / np.float32(runner.input.scale))
    np.testing.assert_array_equal(inputs, np.clip(reference + runner.input.zero_point, -128, 127))
    embedded = np.array(_c_array(text, "g_test_inputs"), dtype=np.int8).reshape(inputs.shape)
    np.testing.assert_array_equal(embedded, inputs)
    np.testing.assert_array_equal(_c_array(text, "g_test_labels"), digits.y_test[:VECTORS])
    expected = np.array(_c_array(text, "g_test_expected"), dtype=np.int8).reshape(VECTORS, -1)
    np.testing.assert_array_equal(expected, runner.run(inputs))
    header = (int8_firmware.out_dir / "test_vectors.h").read_text()
    assert f"#define SMPQ_TEST_VECTOR_COUNT {VECTORS}" in header
    # A trained model: most embedded labels are predicted right by the emulator.
    assert (expected.argmax(axis=1) == digits.y_test[:VECTORS]).mean() > 0.5


def test_int4_vectors_run_through_the_interpreter(int4_model):
    vectors = build_test_vectors(int4_model, count=4, seed=3)
    assert (vectors.labels == -1).all()
    np.testing.assert_array_equal(vectors.expected, TflmRunner(int4_model).run(vectors.inputs))


def test_quantise_input_rounds_and_clamps():
    def spec(n: int, scale: float, zero_point: int) -> TensorSpec:
        return TensorSpec((1, n), np.dtype(np.int8), scale, zero_point)

    x = np.array([[-100.0, -0.26, 0.0, 0.24, 0.26, 10.0]], dtype=np.float32)
    np.testing.assert_array_equal(quantise_input(x, spec(6, 0.5, 3))[0], [-128, 2, 3, 3, 4, 23])
    np.testing.assert_array_equal(quantise_input(x, spec(6, 0.01, -128))[0], [-128, -128, -128, -104, -102, 127])
    half = np.float32([[0.5, 1.5, -0.5]])
    np.testing.assert_array_equal(quantise_input(half, spec(3, 1.0, 0))[0], [0, 2, 0])  # half to even, as np.round


def test_data_layout_mismatch_is_a_user_error(int8_model):
    with pytest.raises(UserError, match="channels"):
        build_test_vectors(int8_model, np.zeros((2, 1, 7, 8), np.float32))
    with pytest.raises(UserError, match="at least 1"):
        build_test_vectors(int8_model, count=0)


# ---- determinism, boards, templates ----------------------------------------------------------


def test_two_generations_are_byte_identical(int8_spec, int8_firmware, tmp_path):
    again = generate_firmware(int8_spec, load_board(QEMU_BOARD), tmp_path / "again")
    assert again.files == int8_firmware.files
    for name in again.files:
        assert (again.out_dir / name).read_bytes() == (int8_firmware.out_dir / name).read_bytes(), name
    assert sorted(p.name for p in again.out_dir.iterdir()) == list(again.files)


@pytest.mark.parametrize("board_name", board_names())
def test_every_board_gets_a_complete_folder(board_name, int8_model):
    board = load_board(board_name)
    files, result = render_firmware(_spec_without_measuring(int8_model), board)
    for name in ("model_data.cc", "model_runner.cc", "main.cc", "test_vectors.cc", "Makefile", "CMakeLists.txt",
                 "README.md", "smpq_timer.c"):
        assert name in files
    assert "@@" not in "".join(files.values())
    make = files["Makefile"]
    assert f"-mcpu={board.core.value}" in make and "-mthumb" in make
    assert ("-mfloat-abi=hard" in make) == board.fpu
    assert f"-DSMPQ_HAS_DWT={int(board.has_dwt)}" in make
    assert f"SMPQ_CLOCK_HZ={int(board.clock_mhz * 1e6)}u" in make
    assert f"KERNELS ?= {board.kernels}" in make
    if result.port == "library":
        assert "linker.ld" not in files and "libsmpq_model.a" in make
    else:
        assert "Reset_Handler" in files["startup_cortex_m.c"] and "__bss_start__" in files["linker.ld"]
        assert "--specs=rdimon.specs" in make
    if not board.has_dwt:
        assert "-DSMPQ_USE_SYSTICK=1" in make
    assert "make TFLM_DIR=" in files["README.md"]


def test_qemu_port_files(int8_firmware):
    out = int8_firmware.out_dir
    linker = (out / "linker.ld").read_text()
    for symbol in ("__end__", "__bss_start__", "__bss_end__", "__StackTop"):
        assert symbol in linker
    assert "ORIGIN = 0x00000000, LENGTH = 4096K" in linker and "ORIGIN = 0x20000000" in linker
    startup = (out / "startup_cortex_m.c").read_text()
    assert "0xE000ED88u" in startup and "_start();" in startup  # CPACR, then newlib's start-up
    make = (out / "Makefile").read_text()
    assert "-M mps2-an386 -nographic -semihosting -icount shift=0" in make
    assert "#define SMPQ_INSTRUCTIONS_PER_TICK 40" in (out / "main.cc").read_text()
    readme = (out / "README.md").read_text()
    assert "qemu-system-arm -M mps2-an386 -nographic -semihosting" in readme and "pyocd" not in readme


def _user_board(tmp_path, base: str, port: str) -> Path:
    """A user's board file: a built-in one renamed, with its own port section."""
    text = (BOARDS_DIR / f"{base}.yaml").read_text()
    text = re.sub(r"(?m)^port:.*(\n[ ]+.*)*", port, text).replace(f"name: {base}", "name: my-board.v2")
    path = tmp_path / "my-board.v2.yaml"
    path.write_text(text)
    return path


def test_a_new_board_with_a_new_port_is_one_yaml_file(tmp_path, int8_model):
    port = ("port: {kind: baremetal, run: stm32, flash_origin: 0x10000000, ram_origin: 0x30000000, ram_kb: 64,\n"
            "       stack_kb: 4, pyocd_target: my_target, dwt_unlock: true}")
    board = load_board(_user_board(tmp_path, "nucleo-l4r5zi", port))
    files, result = render_firmware(_spec_without_measuring(int8_model), board)
    assert result.port == "stm32" and result.qemu_machine is None
    assert "ORIGIN = 0x10000000, LENGTH = 2048K" in files["linker.ld"]
    assert "ORIGIN = 0x30000000, LENGTH = 64K" in files["linker.ld"] and "0x1000" in files["linker.ld"]
    assert "PYOCD_TARGET ?= my_target" in files["Makefile"] and "-DSMPQ_DWT_UNLOCK=1" in files["Makefile"]
    assert 'SMPQ_BOARD_NAME "my-board.v2"' in files["main.cc"] and "APP := smpq_my_board_v2" in files["Makefile"]


def test_a_new_qemu_machine_is_one_yaml_file(tmp_path, int8_model):
    port = ("port: {kind: baremetal, run: qemu, flash_origin: 0x0, ram_origin: 0x20000000, qemu_machine: mps2-an385,\n"
            "       instructions_per_tick: 40}")
    board = load_board(_user_board(tmp_path, "qemu-mps2-an386", port))
    files, result = render_firmware(_spec_without_measuring(int8_model), board)
    assert result.qemu_machine == "mps2-an385" and result.record().qemu_machine == "mps2-an385"
    assert "-M mps2-an385 -nographic" in files["Makefile"] and "-M mps2-an385" in files["README.md"]


@pytest.mark.parametrize("port, complaint", [
    ("", "port: Field required"),
    ("port: {kind: baremetal, run: stm32}", "needs flash_origin and ram_origin"),
    ("port: {kind: library, run: library, flash_origin: 0}", "a library port has no memory map"),
    ("port: {kind: baremetal, run: qemu, flash_origin: 0, ram_origin: 0}", "qemu and qemu_machine go together"),
    ("port: {kind: baremetal, run: jlink, flash_origin: 0, ram_origin: 0}", "port.run"),
    ("port: {kind: library, run: library, stak_kb: 4}", "port.stak_kb"),
])
def test_a_bad_port_section_is_one_line(tmp_path, port, complaint):
    path = _user_board(tmp_path, "nucleo-l4r5zi", port)
    with pytest.raises(UserError, match=re.escape(complaint)) as error:
        load_board(path)
    assert "\n" not in str(error.value) and "my-board.v2.yaml" in str(error.value)


def test_c_text_helpers():
    assert c_identifier("qemu-mps2-an386") == "qemu_mps2_an386"
    assert c_identifier("3d model") == "_3d_model"
    assert c_identifier("") == "_"
    assert c_string('a"b\\c\n?') == 'a\\"b\\\\c\\012\\077'
    assert c_float(0.5) == "0.5f" and c_float(1) == "1.0f"
    assert float(c_float(0.00392156886)[:-1]) == pytest.approx(0.00392156886, rel=1e-7)


def test_templates_are_filled_strictly(tmp_path, monkeypatch):
    template = FileTemplate("x=@@a@@ make=$@ $(CC) lit=@@@@")
    assert template.substitute(a=1) == "x=1 make=$@ $(CC) lit=@@"
    assert template.get_identifiers() == ["a"]
    monkeypatch.setattr("smpq_edge.firmware.templates.FIRMWARE_DIR", tmp_path)
    (tmp_path / "t.in").write_text("@@a@@ @@b@@")
    with pytest.raises(RuntimeError, match="missing"):
        fill_template("t.in", {"a": 1})
    with pytest.raises(RuntimeError, match="unused"):
        fill_template("t.in", {"a": 1, "b": 2, "c": 3})


def test_templates_folder_is_where_the_generator_looks():
    assert (FIRMWARE_DIR / "common" / "main.cc.in").is_file()
    assert (FIRMWARE_DIR / "ports" / "baremetal" / "startup_cortex_m.c").is_file()


@pytest.mark.parametrize("package, folder", [("smpq_edge.firmware_templates", "firmware"),
                                             ("smpq_edge.board_profiles", "boards"),
                                             ("smpq_edge.examples", "examples")])
def test_top_level_folders_ship_as_package_data(package, folder):
    """boards/, firmware/ and examples/ go into the wheel under the names the code finds them by
    (CI's plain `pip install .` checks the wheel itself)."""
    import tomllib

    root = Path(__file__).parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert package in setuptools["packages"] and setuptools["package-dir"][package] == folder
    covered = {p for pattern in setuptools["package-data"][package] for p in (root / folder).glob(pattern)
               if p.is_file()}
    shipped = {p for p in (root / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.name != "__init__.py"}
    assert shipped and shipped <= covered


# ---- kernel selection: only the model's kernels are compiled ---------------------------------


def test_kernel_files_are_the_ops_files_and_their_dependencies():
    assert kernel_files(["CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED"]) == (
        "conv", "conv_common", "depthwise_conv", "depthwise_conv_common", "fully_connected",
        "fully_connected_common", "reduce", "reduce_common")
    assert kernel_files(["AVERAGE_POOL_2D", "MAX_POOL_2D", "ADD", "RELU6"]) == (
        "activations", "activations_common", "add", "add_common", "pooling", "pooling_common")
    assert kernel_files([]) == ()
    # An op the table does not know: compile every kernel rather than fail to link.
    assert kernel_files(["CONV_2D", "SOME_NEW_OP"]) == "all"
    # Every op the resolver can register maps to a kernel file.
    assert all(kernel_files([op]) != "all" for op in ADD_METHODS)


def test_makefile_compiles_only_the_models_kernels(int8_firmware):
    make = (int8_firmware.out_dir / "Makefile").read_text()
    kernels = re.search(r"^TFLM_KERNELS \?= (.*)$", make, re.M).group(1).split()
    assert kernels == list(kernel_files(["CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED"]))
    cmake = (int8_firmware.out_dir / "CMakeLists.txt").read_text()
    assert f'set(TFLM_KERNELS "{" ".join(kernels)}"' in cmake
    # A separate build folder per kernel set, and a shareable one for TFLM's objects.
    assert "BUILD_DIR ?= build-$(KERNELS)" in make and "TFLM_BUILD_DIR ?= $(BUILD_DIR)" in make
    readme = (int8_firmware.out_dir / "README.md").read_text()
    assert "make TFLM_DIR=... KERNELS=reference run" in readme and "TFLM_KERNELS=all" in readme
    assert "python -m smpq_edge validate BUILD_DIR" in readme


def test_self_check_says_what_it_counts(int8_firmware):
    main_cc = (int8_firmware.out_dir / "main.cc").read_text()
    assert '"DWT cycles" : "SysTick ticks"' in main_cc
    assert "per-op profile of the last inference (%s, instructions = ticks x %d)" in main_cc
    assert "cycles per inference" not in main_cc and "(cycles)" not in main_cc
    header = (int8_firmware.out_dir / "model_runner.h").read_text()
    assert "void model_print_profile(uint32_t instructions_per_tick);" in header


# ---- compilation of the files that need no TFLM ------------------------------------------------


APT_TOOLCHAIN = "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib qemu-system-arm"


def _require_tools(*tools: str) -> None:
    """Skip when a system tool is missing, on a developer's machine without the Debian packages;
    under .ci/run (SMPQ_REQUIRE_TOOLCHAIN=1), which installs them, a missing tool is a failure,
    so a broken install step cannot hide behind a skip."""
    missing = [tool for tool in dict.fromkeys(tools) if shutil.which(tool) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed ({APT_TOOLCHAIN})"
    if os.environ.get("SMPQ_REQUIRE_TOOLCHAIN") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_tflm() -> str:
    """The TFLM tree in TFLM_DIR (absolute). Without one: skip on a developer's machine, fail
    under .ci/run (SMPQ_REQUIRE_TOOLCHAIN=1), which points TFLM_DIR at a tree."""
    tflm = os.environ.get("TFLM_DIR")
    message = None
    if not tflm:
        # The project never fetches TFLM itself (it is the user's tree).
        message = ("TFLM_DIR is not set: point it at a tflite-micro checkout with its third-party downloads "
                   "(flatbuffers, gemmlowp, ruy, cmsis, cmsis_nn) to build and run the QEMU self-check")
    elif not (Path(tflm) / "tensorflow/lite/micro/micro_interpreter.h").is_file():
        message = f"TFLM_DIR={tflm} is not a tflite-micro checkout"
    if message is None:
        return str(Path(tflm).resolve())
    if os.environ.get("SMPQ_REQUIRE_TOOLCHAIN") == "1":
        pytest.fail(message)
    pytest.skip(message)


def tflm_build_dir(default: Path, kernels: str = "cmsis_nn") -> Path:
    """Where TFLM's objects go: SMPQ_FIRMWARE_BUILD_CACHE/<board>[-<kernels>] when set (TFLM
    compiles once for all tests), else ``default``."""
    cache = os.environ.get("SMPQ_FIRMWARE_BUILD_CACHE")
    if not cache:
        return default
    return Path(cache).resolve() / (QEMU_BOARD if kernels == "cmsis_nn" else f"{QEMU_BOARD}-{kernels}")


def _compile(compiler: str, flags: list[str], source: Path, tmp_path: Path) -> None:
    result = subprocess.run([compiler, *flags, "-Wall", "-Werror", "-c", str(source), "-o", str(tmp_path / "x.o")],
                            capture_output=True, text=True, cwd=source.parent)
    assert result.returncode == 0, f"{compiler} {source.name}:\n{result.stderr}"


@pytest.mark.parametrize("compiler, flags", [
    ("arm-none-eabi-gcc", ["-mcpu=cortex-m4", "-mthumb"]),
    ("arm-none-eabi-gcc", ["-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"]),
    ("arm-none-eabi-gcc", ["-mcpu=cortex-m0plus", "-mthumb"]),
    ("host", []),
])
def test_plain_generated_files_compile(compiler, flags, int8_firmware, tmp_path):
    out = int8_firmware.out_dir
    c_compiler, cxx_compiler = (("gcc", "g++") if compiler == "host" else (compiler, compiler))
    _require_tools(c_compiler, cxx_compiler)
    for name in PLAIN_CXX:
        _compile(cxx_compiler, [*flags, "-std=c++17", "-Wextra"], out / name, tmp_path)
    for name in PLAIN_C:
        _compile(c_compiler, [*flags, "-std=c11", "-Wextra", "-DSMPQ_HAS_DWT=1"], out / name, tmp_path)
    for header in C_HEADERS:  # the C API headers are valid C as well as C++
        probe = tmp_path / f"probe_{header}.c"
        probe.write_text(f'#include "{header}"\n')
        _compile(c_compiler, [*flags, "-std=c11", f"-I{out}"], probe, tmp_path)


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_firmware(int8_model, tmp_path, capsys):
    model = tmp_path / "digits.tflite"
    model.write_bytes(int8_model)
    out = tmp_path / "fw"
    code = main(["firmware", str(model), "--board", QEMU_BOARD, "--out", str(out), "--data", "digits",
                 "--vectors", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Register_CONV_2D_INT8" in printed and "tensor arena" in printed
    assert "#define SMPQ_TEST_VECTOR_COUNT 3" in (out / "test_vectors.h").read_text()
    assert "digits test split" in (out / "test_vectors.h").read_text()
    assert main(["firmware", str(tmp_path / "missing.tflite"), "--out", str(out)]) == 2
    assert main(["firmware", str(model), "--board", "no-such-board", "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


# ---- the real thing: TFLM build and QEMU run ----------------------------------------------------


def _qemu_self_check(model: bytes, kernels: str, digits, tmp_path: Path, name: str):
    """The generated firmware of ``model`` built with real TFLM and run under QEMU: (generation
    result, QEMU's output, the per-op profile as (op, ticks, instructions)), self-check asserted."""
    _require_tools("arm-none-eabi-g++", "qemu-system-arm", "make")
    tflm = require_tflm()
    vectors = build_test_vectors(model, digits.x_test, digits.y_test, count=VECTORS, origin="digits test split")
    spec = build_spec(model, vectors, name=name)
    result = generate_firmware(spec, load_board(QEMU_BOARD), tmp_path / "fw")
    build_dir = tmp_path / "build"
    build = subprocess.run(["make", f"TFLM_DIR={tflm}", f"KERNELS={kernels}", f"BUILD_DIR={build_dir}",
                            f"TFLM_BUILD_DIR={tflm_build_dir(build_dir, kernels)}", f"-j{os.cpu_count() or 2}"],
                           cwd=result.out_dir, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-semihosting", "-icount", "shift=0",
                          "-kernel", str(build_dir / "smpq_qemu_mps2_an386.elf")],
                         capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"outputs equal to the emulator's: {VECTORS}/{VECTORS}" in run.stdout
    assert "SysTick ticks per inference: min" in run.stdout
    assert "instructions per inference:" in run.stdout and "PASS" in run.stdout
    assert "per-op profile of the last inference (SysTick ticks, instructions = ticks x 40):" in run.stdout
    ops = re.findall(r"^  op +\d+ (\w+) +(\d+) +(\d+)$", run.stdout, re.M)
    assert all(int(instructions) == 40 * int(ticks) for _, ticks, instructions in ops)
    return result, run.stdout, ops


@pytest.mark.parametrize("which, kernels", [("int8", "cmsis_nn"), ("int4", "cmsis_nn"), ("int4", "reference")])
def test_qemu_self_check_matches_the_emulator(which, kernels, request, digits, tmp_path):
    """Build for QEMU mps2-an386 with real TFLM (CMSIS-NN, and the reference kernels via
    ``make KERNELS=reference``) and run: every output byte-equal to the emulator's.

    Set SMPQ_FIRMWARE_BUILD_CACHE to a folder to keep the compiled TFLM between tests and runs
    (it does not depend on the model; a cold TFLM build takes minutes)."""
    model = request.getfixturevalue(f"{which}_model")
    result, stdout, ops = _qemu_self_check(model, kernels, digits, tmp_path, f"digits {which}.tflite")
    assert [op for op, _, _ in ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "MEAN", "FULLY_CONNECTED"]
    used = int(re.search(r"tensor arena: (\d+) of (\d+) bytes used", stdout).group(1))
    assert used <= result.arena_size


@pytest.mark.parametrize("kernels", ["cmsis_nn", "reference"])
def test_qemu_self_check_of_a_model_ending_in_softmax(kernels, int8_model, digits, tmp_path):
    """TFLM's int8 SOFTMAX as the exporter appends it: CMSIS-NN's arm_softmax_s8 and the reference
    kernel give the host interpreter's bytes, and the labels are scored on those probabilities."""
    model = TfliteModel.from_bytes(int8_model)
    model.append_softmax(BETA, OUTPUT_SCALE, OUTPUT_ZERO_POINT)
    model_bytes = model.to_bytes()
    result, stdout, ops = _qemu_self_check(model_bytes, kernels, digits, tmp_path, "digits softmax.tflite")
    assert [op for op, _, _ in ops][-2:] == ["FULLY_CONNECTED", "SOFTMAX"]
    assert "AddSoftmax" in (result.out_dir / "model_runner.cc").read_text()
    probabilities = TflmRunner(model_bytes).run(build_test_vectors(model_bytes, digits.x_test, digits.y_test,
                                                                   count=VECTORS).inputs)
    assert len(np.unique(probabilities)) > 3, "a trained model's probabilities, not only saturated bytes"


@pytest.fixture(scope="session")
def lut_model(digits) -> bytes:
    """digits_cnn exported by smpq_edge with LUT-2, LUT-3 (a DECODE before each), packed INT4 and
    int8 layers (conv, depthwise, pointwise conv, dense), from calibrated float weights."""
    import torch

    from smpq_edge.export.exporter import export_model
    from smpq_edge.network.graph import trace
    from smpq_edge.inputs.models import load_model
    from smpq_edge.network.quant import QuantNet

    torch.manual_seed(0)
    source = load_model("digits_cnn", num_classes=digits.num_classes)
    net = QuantNet(trace(source.module.eval(), source.input_shape), source.module, (2, 3, 4, 8))
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(digits.x_train[:64]))
        net.commit_observations()
    net.eval()
    bits = dict(zip([op.name for op in net.graph.layers], (2, 3, 4, 8)))
    net.set_policy(bits)
    return export_model(net, bits, digits.x_train[:64]).tflite


@pytest.mark.parametrize("kernels", ["cmsis_nn", "reference"])
def test_qemu_self_check_of_lut_layers(kernels, lut_model, digits, tmp_path):
    """TFLM's DECODE expands the LUT layers on the device as on the host: outputs byte-equal; the
    firmware registers DECODE and compiles its kernel files only because the model uses it."""
    result, stdout, ops = _qemu_self_check(lut_model, kernels, digits, tmp_path, "digits lut.tflite")
    assert [op for op, _, _ in ops] == ["TFLM_DECODE", "CONV_2D", "TFLM_DECODE", "DEPTHWISE_CONV_2D", "CONV_2D",
                                        "AVERAGE_POOL_2D", "FULLY_CONNECTED"]
    assert "AddDecode()" in (result.out_dir / "model_runner.cc").read_text()
    makefile = (result.out_dir / "Makefile").read_text()
    assert "decode_state_lut" in makefile
    assert "decode_state_lut" not in kernel_files(["CONV_2D", "FULLY_CONNECTED"])


@pytest.fixture(scope="session")
def wide_model(digits) -> bytes:
    """digits_cnn exported by smpq_edge with 16x8 layers (the first conv and the dense layer:
    int16 activations, int64 bias), an int8 depthwise and a packed INT4 pointwise conv: a
    QUANTIZE at each int8/int16 boundary and before the int8 output."""
    import torch

    from smpq_edge.export.exporter import export_model
    from smpq_edge.network.graph import trace
    from smpq_edge.inputs.models import load_model
    from smpq_edge.network.quant import QuantNet

    torch.manual_seed(0)
    source = load_model("digits_cnn", num_classes=digits.num_classes)
    net = QuantNet(trace(source.module.eval(), source.input_shape), source.module, (4, 8))
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(digits.x_train[:64]))
        net.commit_observations()
    net.eval()
    names = [op.name for op in net.graph.layers]
    bits = dict(zip(names, (8, 8, 4, 8)))
    net.set_policy(bits)
    net.set_activation_bits(frozenset({names[0], names[3]}))
    return export_model(net, bits, digits.x_train[:64]).tflite


@pytest.mark.parametrize("kernels", ["cmsis_nn", "reference"])
def test_qemu_self_check_of_int16_activation_layers(kernels, wide_model, digits, tmp_path):
    """TFLM's 16x8 conv and fully connected kernels (CMSIS-NN's s16 ones, and the reference ones)
    and its QUANTIZE between int8 and int16 give the host interpreter's bytes on the device; the
    ops with int16 instances get the generic registration."""
    result, stdout, ops = _qemu_self_check(wide_model, kernels, digits, tmp_path, "digits w8a16.tflite")
    assert [op for op, _, _ in ops] == ["QUANTIZE", "CONV_2D", "QUANTIZE", "DEPTHWISE_CONV_2D", "CONV_2D",
                                        "AVERAGE_POOL_2D", "QUANTIZE", "FULLY_CONNECTED", "QUANTIZE"]
    runner = (result.out_dir / "model_runner.cc").read_text()
    assert "AddQuantize()" in runner and "AddFullyConnected()" in runner
    assert "quantize_common" in (result.out_dir / "Makefile").read_text()
