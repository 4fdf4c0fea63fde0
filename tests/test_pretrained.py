"""A model that arrives trained is never made worse than plain int8 quantisation of it: every
training stage is checked on validation and undone when it loses, the floor is measured and
recorded, and ``--ptq`` trains nothing."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from smpq_edge.boards import load_board
from smpq_edge.cli import main
from smpq_edge.data import load_dataset
from smpq_edge.models import load_model
from smpq_edge.search.guard import FloorCheck, StageGuard, paired_standard_error
from smpq_edge.search.runner import SearchConfig, run_search
from smpq_edge.search.train import TrainConfig, seed_everything, train


@pytest.fixture(scope="module")
def pretrained_digits():
    """digits_cnn trained in float here, then handed to the search as a user's trained model."""
    data = load_dataset("digits", seed=0)
    seed_everything(0)
    source = load_model("digits_cnn", num_classes=data.num_classes)
    train(source.module, data, TrainConfig(epochs=8, lr=1e-2), seed=0, progress=False)
    return replace(source, pretrained=True), data


def _search(source, data, config):
    fresh = replace(source, module=copy.deepcopy(source.module))
    return run_search(fresh, data, load_board("nucleo-l4r5zi"), config=config, seed=0, progress=False,
                      log=lambda _: None).record


def test_a_damaging_stage_is_undone_and_the_floor_kept(pretrained_digits):
    source, data = pretrained_digits
    # Adam at a learning rate of 1 wrecks any trained network within an epoch.
    wreck = TrainConfig(epochs=1, lr=1.0)
    config = replace(SearchConfig.quick(), warmup=wreck, search=wreck, finetune=wreck, baselines=())
    record = _search(source, data, config)
    checks = {c["stage"]: c for c in record["stage_checks"]}
    assert set(checks) == {"warm-up", "SMPQ search", "finetune SMPQ"}
    for check in checks.values():
        assert check["undone"], check
        assert check["val_acc_after"] < check["val_acc_before"] - check["standard_error"]
    floor = record["floor_check"]
    assert not floor["below_floor"]
    assert floor["shipped_val_acc"] >= floor["floor_val_acc"] - floor["standard_error"]
    reference = record["reference"]
    assert set(reference) == {"float", "ptq_int8", "shipped"}
    assert reference["ptq_int8"]["test_acc"] > 0.8  # calibration-only int8 of a trained digits CNN
    assert reference["shipped"]["test_acc"] >= reference["ptq_int8"]["test_acc"] - 0.03


def test_the_pretrained_schedule_distils_gently(pretrained_digits):
    config = SearchConfig.quick().for_pretrained()
    for stage in (config.warmup, config.search, config.finetune):
        assert stage.distill == 1.0 and stage.lr <= 1e-4
    source, data = pretrained_digits
    record = _search(source, data, replace(config, baselines=()))
    assert record["pretrained"] is True
    shipped, floor = record["reference"]["shipped"], record["reference"]["ptq_int8"]
    assert shipped["val_agreement"] >= floor["val_agreement"] - 0.03
    assert not record["floor_check"]["below_floor"]


def test_ptq_trains_nothing(pretrained_digits):
    source, data = pretrained_digits
    record = _search(source, data, SearchConfig.quick().post_training_only())
    assert record["stage_checks"] == []  # no stage ran, so none was checked
    assert "dmpq" not in {m["method"] for m in record["methods"]}
    for method in record["methods"]:
        assert method["test_acc_before_finetune"] == method["test_acc"]


def test_ptq_refuses_an_untrained_model(tmp_path, capsys):
    code = main(["search", "--ptq", "--quick", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ptq: model digits_dense is not trained") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_guard_keeps_a_stage_that_does_not_lose():
    y = np.array([1] * 70 + [0] * 30)
    guard = StageGuard(np.zeros((100, 1, 1, 1), np.float32), y, log=lambda _: None)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.w.expand(len(x), 2)

    net = Net()
    with torch.no_grad():
        net.w.copy_(torch.tensor([0.0, 1.0]))  # predicts 1: right on 70 of 100
    kept = guard.run("better", net, lambda n: None)
    assert kept is net and not guard.checks[-1].undone

    def worse(n):
        with torch.no_grad():
            n.w.copy_(torch.tensor([1.0, 0.0]))  # predicts 0: right on 30 of 100

    back = guard.run("worse", net, worse)
    assert guard.checks[-1].undone and back is not net
    assert float(back.w[1]) == 1.0


def test_floor_check_and_standard_error():
    y = np.array([1] * 10)
    floor = np.array([1] * 9 + [0])
    shipped = np.array([1] * 5 + [0] * 5)
    check = FloorCheck.of(shipped == y, floor == y)
    assert check.below_floor and "below plain int8" in check.warning()
    assert not FloorCheck.of(floor == y, floor == y).below_floor
    assert paired_standard_error(np.ones(4), np.ones(4)) == 0.0
