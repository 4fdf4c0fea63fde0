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

from smpq_edge.boards import BOARDS_DIR
from smpq_edge.cli import main
from smpq_edge.data import load_dataset
from smpq_edge.models import load_model
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


def test_default_build_writes_every_artefact(default_build):
    for name in OUTPUTS:
        assert (default_build / name).is_file(), name
    assert (default_build / "firmware" / "model_data.cc").is_file()
    emulation = json.loads((default_build / "emulation.json").read_text())
    assert emulation["label_agreement"] >= 0.99
    assert emulation["model_bytes"] == (default_build / "model.tflite").stat().st_size
    # The firmware is sized from the emulate stage's arena measurement of the same model.
    firmware = json.loads((default_build / "firmware" / "firmware.json").read_text())
    assert firmware["arena"]["measured"] == emulation["arena_bytes"] > 0
    record = json.loads((default_build / "build.json").read_text())
    assert list(record["stages"]) == ["search", "export", "emulate", "firmware", "report"]
    assert record["arguments"]["board"] == "nucleo-l4r5zi" and record["versions"]["torch"]
    assert not list(default_build.rglob(".*.tmp")), "no temporary file may be left behind"


def test_report_takes_an_emulation_record_from_emulate_alone(default_build):
    # `emulate MODEL.tflite` writes emulation.json beside the model without the fake-quant
    # comparison; a report made from a build folder after that must still come out.
    search = json.loads((default_build / "search.json").read_text())
    emulation = json.loads((default_build / "emulation.json").read_text())
    alone = {**emulation, "label_agreement": None, "mean_abs_output_delta": None, "max_abs_output_delta": None}
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
    assert capsys.readouterr().out.count("unchanged, skipped (--resume)") == 5
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
    assert err == ["error: model digits_cnn expects input (1, 8, 8), data mnist1d has (1, 40, 1)"]

