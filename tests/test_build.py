"""`build` end to end on a reduced setting: outputs, report, resume after a kill, user inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from smpq_edge.inputs.boards import BOARDS_DIR, load_board
from smpq_edge.api import DEFAULT_BOARD
from smpq_edge.cli import main
from smpq_edge.inputs.data import load_dataset
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.inputs.models import load_model
from smpq_edge.common.records import read_emulation, read_search
from smpq_edge.report import make_report
from smpq_edge.search.train import TrainConfig, train

QUICK = ["--quick", "--no-baselines"]
OUTPUTS = ["policy.json", "search.json", "quantnet.pt", "model.tflite", "model_int8.tflite", "emulation.json",
           "report.md", "report.html", "build.json"]


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    assert main(["build", "--out", str(out), *QUICK]) == 0
    return out


def test_library_warnings_do_not_reach_the_terminal_but_the_sdks_do():
    import warnings

    main(["boards"])  # installs the CLI's filter, as every command does
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("Tight layout not applied", UserWarning, "layout_engine.py", 1,
                               module="matplotlib.layout_engine", registry={})
        warnings.warn_explicit("deprecated", FutureWarning, "x.py", 1, module="torch.onnx", registry={})
        warnings.warn_explicit("class 3 has no sample in the val split", UserWarning, "data.py", 1,
                               module="smpq_edge.inputs.data", registry={})
    assert [str(w.message) for w in caught] == ["class 3 has no sample in the val split"]


def test_default_build_writes_every_artefact(default_build):
    for name in OUTPUTS:
        assert (default_build / name).is_file(), name
    assert (default_build / "firmware" / "model_data.cc").is_file()
    emulation = json.loads((default_build / "emulation.json").read_text())
    assert emulation["label_agreement"] >= 0.99
    assert emulation["model_bytes"] == (default_build / "model.tflite").stat().st_size
    # The firmware is sized from the emulate stage's arena measurement of the same model.
    # The default board runs CMSIS-NN kernels: the firmware is sized from the cost model's target
    # arena for the shipped policy, not from the host's reference kernels (which unpack INT4).
    firmware = json.loads((default_build / "firmware" / "firmware.json").read_text())
    shipped = json.loads((default_build / "search.json").read_text())["methods"][0]["cost"]
    assert firmware["arena"]["estimate"] == shipped["arena_bytes"] > 0
    assert "target arena" in firmware["arena"]["basis"]
    assert json.loads((default_build / "search.json").read_text())["shapley"]["value"] == "kl"
    record = json.loads((default_build / "build.json").read_text())
    assert list(record["stages"]) == ["search", "export", "emulate", "firmware", "report"]
    assert record["arguments"]["board"] == "nucleo-l412kb" and record["versions"]["torch"]
    assert not list(default_build.rglob(".*.tmp")), "no temporary file may be left behind"


def test_report_takes_an_emulation_record_from_emulate_alone(default_build):
    # `emulate MODEL.tflite` writes emulation.json beside the model without the fake-quant
    # comparison; a report made from a build folder after that must still come out.
    search = read_search(default_build / "search.json")
    emulation = read_emulation(default_build / "emulation.json")
    alone = emulation.model_copy(update={"label_agreement": None, "mean_abs_output_delta": None,
                                         "max_abs_output_delta": None})
    markdown = make_report(search, alone).markdown
    assert "label agreement" not in markdown and "smallest tensor arena" in markdown
    assert "label agreement" in make_report(search, emulation).markdown


def test_report_html_embeds_its_images(default_build):
    html = (default_build / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4
    assert "src=\"http" not in html and ".png\"" not in html, "the HTML must not refer to outside files"
    assert "TFLM emulator" in html


def test_resume_skips_finished_stages(default_build, capsys):
    before = {name: (default_build / name).stat().st_mtime_ns for name in OUTPUTS if name != "build.json"}
    assert main(["build", "--out", str(default_build), *QUICK, "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged, skipped (--resume)") == 5
    # The summary's stage times say which ran now: none did.
    times = next(line for line in out.splitlines() if line.startswith("wall time per stage: search "))
    assert times.count("(skipped; earlier run)") == 5 and times.endswith("; 0.0 s in all this run")
    after = {name: (default_build / name).stat().st_mtime_ns for name in before}
    assert after == before


def test_build_killed_between_stages_resumes_without_redoing(tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "smpq_edge", "build", "--out", str(out), *QUICK]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    record = out / "build.json"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if record.exists() and "search" in json.loads(record.read_text())["stages"]:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # as a kill -9 between (or during) later stages would
    process.wait()
    finished = json.loads(record.read_text())["stages"]
    assert "search" in finished
    search_mtime = (out / "search.json").stat().st_mtime_ns
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[search] unchanged, skipped (--resume)" in done.stdout
    assert (out / "search.json").stat().st_mtime_ns == search_mtime
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not list(out.rglob(".*.tmp")), "a write cut off by the kill must be cleaned up on resume"


def test_build_with_user_board_npz_data_and_onnx_model(tmp_path):
    board = yaml.safe_load((BOARDS_DIR / "stm32f412.yaml").read_text())
    board.update(name="my-board", description="a user's own profile")
    board_path = tmp_path / "my-board.yaml"
    board_path.write_text(yaml.safe_dump(board))
    digits = load_dataset("digits", seed=0)
    data_path = tmp_path / "mydigits.npz"
    np.savez(data_path, x=np.concatenate([digits.x_train, digits.x_val])[:, 0],
             y=np.concatenate([digits.y_train, digits.y_val]), x_test=digits.x_test[:, 0], y_test=digits.y_test)
    torch.manual_seed(0)
    source = load_model("digits_cnn")
    train(source.module, digits, TrainConfig(epochs=4, lr=1e-2), seed=0, progress=False)
    onnx_path = tmp_path / "trained_digits.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source.module.eval(), torch.zeros(1, 1, 8, 8), str(onnx_path), dynamo=False,
                          opset_version=17, input_names=["input"])
    out = tmp_path / "out"
    assert main(["build", "--board", str(board_path), "--data", str(data_path), "--model", str(onnx_path),
                 "--out", str(out), *QUICK]) == 0
    search = json.loads((out / "search.json").read_text())
    assert search["board"] == "my-board" and search["data"]["name"] == "mydigits"
    assert search["data"]["test"] == len(digits.y_test)
    assert search["float_test_acc"] > 0.6, "the ONNX model arrives trained and is not trained again"
    assert Path(out / "firmware" / "model_data.cc").is_file()


STAGES = ["search", "export", "emulate", "firmware", "report"]


@pytest.fixture()
def fake_stages(monkeypatch):
    """Every stage replaced by one that writes fixed outputs and notes that it ran: what is tested
    is which stages a change of input reruns, not what they compute."""
    import smpq_edge.stages as build
    import smpq_edge.cli as cli
    import smpq_edge.search.runner as runner

    ran = []

    def writer(name, *files):
        def run(folder, *args, **kwargs):
            ran.append(name)
            for file in files:
                (folder / file).write_text(f"{file} by the fake {name} stage\n")
        return run

    monkeypatch.setattr(runner, "run_search", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "save_search", lambda result, folder: writer(
        "search", "policy.json", "search.json", "quantnet.pt")(folder))
    monkeypatch.setattr(build, "export_stage", writer("export", "model.tflite", "model_int8.tflite", "export.json"))
    monkeypatch.setattr(build, "emulate_stage", writer("emulate", "emulation.json"))
    monkeypatch.setattr(build, "firmware_stage", writer("firmware", "firmware"))
    monkeypatch.setattr(build, "report_stage", writer("report", "report.md", "report.html"))
    monkeypatch.setattr(cli, "_print_build_summary", lambda out, stages=None: None)
    return ran


def test_resume_reruns_exactly_the_stages_that_read_a_changed_input(tmp_path, monkeypatch, fake_stages):
    import smpq_edge.stages as build
    import smpq_edge.firmware.templates as firmware
    from smpq_edge.inputs.models import EXAMPLES_DIR

    model = tmp_path / "model.py"
    model.write_text((EXAMPLES_DIR / "digits_cnn.py").read_text())
    digits = load_dataset("digits", seed=0)
    data = tmp_path / "data.npz"
    np.savez(data, x=digits.x_train[:200, 0], y=digits.y_train[:200])
    board = tmp_path / "board.yaml"
    board.write_text((BOARDS_DIR / "stm32f412.yaml").read_text().replace("name: stm32f412", "name: board"))
    code = tmp_path / "package"
    code.mkdir()
    (code / "search.py").write_text("EPOCHS = 6\n")
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "main.cc.in").write_text("int main() {}\n")
    monkeypatch.setattr(build, "PACKAGE_DIR", code)
    monkeypatch.setattr(firmware, "FIRMWARE_DIR", templates)
    command = ["build", "--out", str(tmp_path / "out"), "--model", str(model), "--data", str(data),
               "--board", str(board), *QUICK, "--resume"]

    def rerun_after(edit) -> list[str]:
        edit()
        fake_stages.clear()
        assert main(command) == 0
        return list(fake_stages)

    assert rerun_after(lambda: None) == STAGES
    assert rerun_after(lambda: None) == []
    # The case: a model file edited from 16 to 24 channels was skipped by every stage.
    assert rerun_after(lambda: model.write_text(model.read_text().replace("16", "24"))) == \
        ["search", "export", "emulate"]
    np.savez(tmp_path / "other.npz", x=digits.x_train[1:201, 0], y=digits.y_train[1:201])
    assert rerun_after(lambda: (tmp_path / "other.npz").replace(data)) == ["search", "export", "emulate", "firmware"]
    assert rerun_after(lambda: board.write_text(board.read_text() + "# calibrated on the real board\n")) == \
        ["search", "export", "emulate", "firmware"]
    assert rerun_after(lambda: (code / "search.py").write_text("EPOCHS = 8\n")) == STAGES
    assert rerun_after(lambda: (templates / "main.cc.in").write_text("int main() { return 0; }\n")) == ["firmware"]
    assert rerun_after(lambda: None) == []


def test_export_of_an_edited_policy_finetunes_for_it(default_build, tmp_path, capsys):
    out = tmp_path / "edited"
    shutil.copytree(default_build, out)
    policy = json.loads((out / "policy.json").read_text())
    for layer in policy["layers"]:
        layer["weight_bits"] = 4
    (out / "policy.json").write_text(json.dumps(policy))
    capsys.readouterr()
    assert main(["export", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    note = next(line for line in printed.splitlines() if "finetuned for policy.json" in line)
    assert "quantnet.pt was finetuned for another policy" in note and "% after" in note
    assert note.removeprefix("note: ") in json.loads((out / "export.json").read_text())["notes"]
    saved = torch.load(out / "quantnet.pt", weights_only=True)
    assert set(saved["trained_bits"].values()) == {4}, "the finetuned network is saved for the next export"
    assert main(["export", "--out", str(out)]) == 0
    assert "finetuned" not in capsys.readouterr().out, "a network trained for the policy is not trained again"


def test_export_with_data_the_model_does_not_take(default_build, capsys):
    assert main(["export", "--out", str(default_build), "--data", "mnist1d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model digits_dense expects input (1, 8, 8), data mnist1d has (1, 40, 1)"]


def test_emulate_alone_keeps_the_builds_emulation_record(default_build, capsys):
    record = (default_build / "emulation.json").read_text()
    assert main(["emulate", str(default_build / "model_int8.tflite")]) == 0
    assert (default_build / "emulation.json").read_text() == record, "the build's agreement figures stay"
    alone = json.loads((default_build / "emulation_model_int8.json").read_text())
    assert alone["label_agreement"] is None and alone["samples"] == json.loads(record)["samples"]


def test_summary_and_report_say_what_each_figure_is(default_build, capsys):
    from smpq_edge.cli import _print_build_summary

    _print_build_summary(default_build)
    out = capsys.readouterr().out
    header = out.strip().splitlines()[0]
    for column in ("float", "PTQ int8 (floor)", "shipped (fake-quant)", "shipped (TFLM emulator)"):
        assert column in header
    assert "board reserve" in out and "whole firmware" in out
    assert "weights per layer: conv0 (conv) int" in out  # names and kinds, not bare indices
    assert "firmware allocates" in out and "over the flash budget" not in out
    # The summary and the report count the exported .tflite in the flash total, the same figure.
    emulation = read_emulation(default_build / "emulation.json")
    cost, report = read_search(default_build / "search.json").shipped.cost, (default_build / "report.md").read_text()
    exported_total = f"{cost.flash_total_with(emulation.model_bytes):,} B"
    assert exported_total in out and exported_total in report
    assert f"{emulation.model_bytes:,} B (.tflite; predicted {cost.model_flash_bytes:,} B)" in report
    # Each arena figure says which kernels it assumes; the floor verdict fits the numbers.
    assert "(*) the arena predicted for board nucleo-l412kb with CMSIS-NN kernels" in out
    assert "host TFLM interpreter ran the model in" in out and "reference kernels" in out
    assert "keeps the floor" not in out and "int8 floor: validation accuracy" in out
    search = read_search(default_build / "search.json")
    assert f"{search.data['train']:,} training / {search.data['val']:,} validation / {search.data['test']:,} test" \
        in (default_build / "report.md").read_text()
    markdown = (default_build / "report.md").read_text()
    for section in ("## Why this policy", "## Training stages", "PTQ int8: every layer int8, calibration only",
                    "weight shape (TFLite)", "test agreement with float"):
        assert section in markdown
    html = (default_build / "report.html").read_text()
    row = next(r for r in html.split("<tr>") if "output difference" in r)
    assert row.count("<td>") == 2, "the output-difference row is one figure and one value"


SOFTMAX_MODEL = """from torch import nn
INPUT_SHAPE = (1, 8, 8)
DATASET = "digits"


def build_model(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, num_classes),
                         nn.Softmax(dim=1))
"""


def test_build_of_a_model_ending_in_softmax_ships_tflms_softmax(tmp_path, capsys):
    model = tmp_path / "soft_digits.py"
    model.write_text(SOFTMAX_MODEL)
    out = tmp_path / "out"
    assert main(["build", "--model", str(model), "--out", str(out), *QUICK]) == 0
    assert "Softmax dropped" not in capsys.readouterr().out
    tflite = TfliteModel.from_file(out / "model.tflite")
    assert [op.name for op in tflite.operators()][-2:] == ["FULLY_CONNECTED", "SOFTMAX"]
    output = tflite.tensor(tflite.outputs[0]).quantization
    assert (output.scales, output.zero_points) == ((1 / 256,), (-128,))
    emulation = read_emulation(out / "emulation.json")
    # The fake-quant network's logits through the same integer softmax: the same bytes as TFLM's.
    assert emulation.label_agreement == 1.0 and emulation.max_abs_output_delta < 1e-9
    assert json.loads((out / "emulation.json").read_text())["output_scale"] == 1 / 256 and emulation.accuracy > 0.5
    assert "AddSoftmax" in (out / "firmware" / "model_runner.cc").read_text()
    # The search priced the model it ships: its cost ends in the SOFTMAX too.
    shipped_cost = json.loads((out / "search.json").read_text())["methods"][0]["cost"]
    assert [op["op"] for op in shipped_cost["ops"]][-1] == "SOFTMAX"
    # --logits: the same build folder exported without it, and the one-line notice.
    assert main(["export", "--model", str(model), "--out", str(out), "--logits"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("note: final Softmax dropped (--logits)") == 1
    assert "SOFTMAX" not in [op.name for op in TfliteModel.from_file(out / "model.tflite").operators()]
    assert json.loads((out / "export.json").read_text())["softmax"] is False


def test_summary_sets_the_pick_beside_the_baselines(default_build, tmp_path, capsys):
    from smpq_edge.cli import _print_build_summary

    out = tmp_path / "with_baselines"
    shutil.copytree(default_build, out)
    record = json.loads((out / "search.json").read_text())
    hawq = json.loads(json.dumps(record["methods"][0]))
    hawq["method"], hawq["test_acc"] = "hawq", 0.5
    hawq["bits"] = {name: 4 for name in hawq["bits"]}
    record["methods"].append(hawq)
    record["config"]["baselines"] = ["hawq", "uniform4"]  # uniform8 left untried
    (out / "search.json").write_text(json.dumps(record))
    _print_build_summary(out)
    lines = capsys.readouterr().out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("methods under the same budgets")):]
    bits = " ".join(str(b) for b in record["methods"][0]["bits"].values())
    assert table[3].split()[0] == "smpq" and bits in table[3]
    assert table[4].split()[0] == "hawq" and "50.00 %" in table[4]
    # A uniform policy the search tried and did not record was over the budget (run_search records
    # it so); one it did not try is said to be not run, not to be over a budget.
    assert [line.split()[0] for line in table[5:7]] == ["uniform4", "uniform8"]
    assert "over budget" in table[5] and "not run" in table[6]


def test_summary_says_when_the_rerank_replaced_the_shapley_optimum(default_build, capsys):
    from smpq_edge.cli import rerank_note
    from smpq_edge.inputs.task import TASKS

    search = read_search(default_build / "search.json")
    assert len(search.k_best) >= 2
    rerank_note(search.model_copy(update={"k_best": [k.model_copy(update={"chosen": i == 0})
                                                     for i, k in enumerate(search.k_best)]}), TASKS[search.task])
    assert capsys.readouterr().out == "", "nothing to say when the optimum itself was picked"
    names = list(search.k_best[1].bits)
    mixed = {name: 4 if i == 0 else 8 for i, name in enumerate(names)}
    second = [k.model_copy(update={"chosen": i == 1, **({"bits": mixed} if i == 1 else {})})
              for i, k in enumerate(search.k_best)]
    rerank_note(search.model_copy(update={"k_best": second}), TASKS[search.task])
    out = capsys.readouterr().out
    assert "picked the K-best policy #2" in out and f"over the best by {search.k_best[0].source}" in out
    assert TASKS[search.task].show(search.k_best[1].val_acc) in out and TASKS[search.task].show(search.k_best[0].val_acc) in out
    # A uniform challenger (the re-rank measures the uniform policies that fit too) is named as such.
    uniform = [k.model_copy(update={"chosen": i == 1, **({"bits": dict.fromkeys(names, 4)} if i == 1 else {})})
               for i, k in enumerate(search.k_best)]
    rerank_note(search.model_copy(update={"k_best": uniform}), TASKS[search.task])
    assert "picked the uniform int4 policy" in capsys.readouterr().out


def test_stage_times_name_each_stage_and_what_ran():
    from smpq_edge.cli import stage_times
    from smpq_edge.common.records import StageRun

    line = stage_times({"search": StageRun(inputs="", outputs={}, seconds=8.84),
                        "export": StageRun(inputs="", outputs={}, seconds=11.5, skipped=True),
                        "emulate": StageRun(inputs="", outputs={}, seconds=3.06)})
    assert line == ("wall time per stage: search 8.8 s, export 11.5 s (skipped; earlier run), emulate 3.1 s; "
                    "11.9 s in all this run")


def test_records_round_trip_through_their_classes(default_build):
    """search.json, emulation.json, firmware.json and build.json are written by their record
    classes and read back by the same classes: every field written is declared (nothing is
    dropped or passed around as a dict)."""
    from smpq_edge.common.records import read_build, read_firmware

    for name, reader in (("search.json", read_search), ("emulation.json", read_emulation),
                         ("firmware/firmware.json", read_firmware), ("build.json", read_build)):
        raw = json.loads((default_build / name).read_text())
        assert reader(default_build / name).model_dump(mode="json") == raw, name


def test_a_policy_width_the_search_did_not_build_is_one_line(default_build, tmp_path, capsys):
    """policy.json edited to 3-bit weights on a board whose candidates are w4a8 w8a8: the search's
    network has no such candidate, and export says so in one line, writing nothing."""
    out = tmp_path / "lut"
    shutil.copytree(default_build, out)
    (out / "model.tflite").unlink()
    policy = json.loads((out / "policy.json").read_text())
    policy["layers"][0]["weight_bits"] = 3
    (out / "policy.json").write_text(json.dumps(policy))
    capsys.readouterr()
    assert main(["export", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "policy.json: layer" in err and "w3a8 is not a candidate (w4a8, w8a8)" in err
    assert not (out / "model.tflite").exists()


def test_int16_layers_set_in_policy_json_are_exported(default_build, tmp_path, capsys):
    """Setting two layers' activation_bits to 16 and exporting: they become 16x8 layers (no
    finetune: the weights are unchanged), the fake-quant computes what TFLM computes on every
    test sample, and the export and the report say which layers run int16 activations."""
    from smpq_edge.stages import emulate_stage, report_stage

    out = tmp_path / "wide"
    shutil.copytree(default_build, out)
    policy = json.loads((out / "policy.json").read_text())
    wide = [policy["layers"][0]["name"], policy["layers"][-1]["name"]]
    for layer in policy["layers"]:
        if layer["name"] in wide:
            layer["weight_bits"], layer["activation_bits"] = 8, 16
    (out / "policy.json").write_text(json.dumps(policy))
    capsys.readouterr()
    assert main(["export", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    exported = json.loads((out / "export.json").read_text())
    assert exported["int16_activations"] == sorted(wide) and exported["quantize_ops"] >= 2
    names = [o.name for o in TfliteModel.from_file(out / "model.tflite").operators()]
    assert names.count("QUANTIZE") == exported["quantize_ops"] and names[-1] == "QUANTIZE"  # the output is int8
    data = load_dataset("digits", seed=0)
    emulation = emulate_stage(out, load_model("digits_dense", num_classes=data.num_classes), data,
                              load_board(DEFAULT_BOARD))
    assert emulation.label_agreement == 1.0 and emulation.max_abs_output_delta < 1e-3 * emulation.output_scale
    report_stage(out)
    note = f"int16 activations (TFLM's 16x8 kernels): {', '.join(sorted(wide))}, with a QUANTIZE"
    report = (out / "report.md").read_text()
    assert note in printed and note in report
    assert "set in policy.json, not the search's pick, whose cost figures are for its own int16 layers (none)" in report
