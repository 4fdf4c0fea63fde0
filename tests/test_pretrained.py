"""A model that arrives trained is never made worse than plain int8 quantisation of it: every
training stage is checked on validation and undone when it loses, the floor is measured and
recorded, and ``--ptq`` trains nothing."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from smpq_edge.common.precision import Precision, weight_bits_of
from smpq_edge.inputs.boards import load_board
from smpq_edge.cli import main
from smpq_edge.inputs.data import load_dataset
from smpq_edge.inputs.models import load_model
from smpq_edge.search.guard import StageGuard, check_floor, paired_standard_error
from smpq_edge.inputs.task import CLASSIFICATION
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


def _search(source, data, config, log=lambda _: None):
    fresh = replace(source, module=copy.deepcopy(source.module))
    return run_search(fresh, data, load_board("nucleo-l4r5zi"), config=config, seed=0, progress=False,
                      log=log).record.model_dump(mode="json")


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
    logged = []
    record = _search(source, data, SearchConfig.quick().post_training_only(), logged.append)
    assert record["stage_checks"] == []  # no stage ran, so none was checked
    assert logged and not any("finetune" in line for line in logged), logged
    assert not any("finetune" in key for key in record["timings"]), record["timings"]
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
    check = check_floor(shipped == y, floor == y)
    assert check.below_floor and check.verdict(CLASSIFICATION).startswith("the shipped model is BELOW the int8 floor")
    assert check_floor(floor == y, floor == y).verdict(CLASSIFICATION).startswith("the shipped model is at or above")
    slightly = check_floor(np.array([1] * 8 + [0] * 2) == y, floor == y)
    assert not slightly.below_floor and "within one standard error" in slightly.verdict(CLASSIFICATION)
    assert not check_floor(floor == y, floor == y).below_floor
    assert paired_standard_error(np.ones(4), np.ones(4)) == 0.0


# --- the floor is enforced: what ships when SMPQ's pick falls below it -----------------------------

class _PolicyNet(torch.nn.Module):
    """Right on every sample under the policies in ``good``, wrong on every one otherwise (labels
    are the argmax of the two input features)."""

    def __init__(self, good: list[dict[str, Precision]], bits: dict[str, Precision]):
        super().__init__()
        self.good, self.bits = good, bits
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where the network lives, for predictions()

    def set_policy(self, bits):
        self.bits = bits

    def forward(self, x):
        sign = 1.0 if self.bits in self.good else -1.0
        return sign * x.flatten(1)


def _floor_run(int8_fits: bool, logged: list[str]):
    from types import SimpleNamespace

    from smpq_edge.common.distributed import SINGLE_PROCESS
    from smpq_edge.inputs.task import CLASSIFICATION

    x = np.random.default_rng(0).normal(size=(200, 2, 1, 1)).astype(np.float32)
    y = x[:, :, 0, 0].argmax(1)
    data = SimpleNamespace(x_val=x[:100], y_val=y[:100], x_test=x[100:], y_test=y[100:], task="classification")
    layers = [SimpleNamespace(name=n) for n in ("a", "b")]

    def cost(policy):
        bits = weight_bits_of(policy)
        fits = {"flash": int8_fits or 4 in bits.values(), "ram": True, "cycles": True}
        per_layer = [SimpleNamespace(name=n, weight_bits=b, flash_bytes=100 * b) for n, b in bits.items()]
        record = {"fits": fits, "model_flash_bytes": 100 * sum(bits.values()), "arena_bytes": 0, "cycles": 1,
                  "reserve_flash_bytes": 0, "reserve_ram_bytes": 0, "flash_total_bytes": 0, "ram_total_bytes": 0,
                  "flash_budget_bytes": 1, "ram_budget_bytes": 1, "cycle_budget": 1, "latency_ms": 0.0,
                  "layers": [{"name": n, "kind": "fc", "weight_bits": b, "params": 1, "macs": 1, "flash_bytes": 100 * b,
                              "scratch_bytes": 0, "cycles": 1} for n, b in bits.items()]}
        return SimpleNamespace(fits=fits, layers=per_layer, to_dict=lambda: record)

    from smpq_edge.search.train import per_sample, predictions

    def val_scores(net):
        return per_sample(net, data.x_val, data.y_val)

    def predict(net, split):
        return predictions(net, data.x_val if split == "val" else data.x_test)

    none = TrainConfig(epochs=0)
    return SimpleNamespace(data=data, task=CLASSIFICATION, candidates=(Precision(4), Precision(8)),
                           graph=SimpleNamespace(layers=layers),
                           config=SimpleNamespace(finetune=none, search=none), seed=0, progress=False,
                           context=SINGLE_PROCESS, log=logged.append, cost=cost, per_sample=val_scores,
                           predict=predict)


def _policy(a: int, b: int) -> dict[str, Precision]:
    return {"a": Precision(a), "b": Precision(b)}


def _ranked(*policies):
    from types import SimpleNamespace

    from smpq_edge.search.runner import Ranked

    return [Ranked(None, SimpleNamespace(score=1.0 - i / 10), bits, "Shapley at the budget")
            for i, bits in enumerate(policies)]


def test_below_the_floor_with_int8_in_budget_ships_the_floor():
    from smpq_edge.search.runner import _keep_floor

    int8, pick = _policy(8, 8), _policy(4, 4)
    logged, methods = [], []
    floor = _PolicyNet([int8], int8)
    net, check, action = _keep_floor(_floor_run(True, logged), floor, _PolicyNet([int8], pick), pick,
                                     _ranked(pick), methods, None)
    assert action.action == "uniform int8" and action.shipped_method == "floor int8"
    assert net.bits == int8 and not check.below_floor
    assert [m.method for m in methods] == ["floor int8"] and methods[0].policy == int8
    assert "SMPQ's pick (4 4) scored validation accuracy 0.00 %" in logged[0]


def test_below_the_floor_over_budget_tries_the_next_policies_from_the_floor():
    from smpq_edge.search.runner import _keep_floor

    int8, pick, second, third = _policy(8, 8), _policy(4, 4), _policy(4, 8), _policy(8, 4)
    logged, methods = [], []
    floor = _PolicyNet([int8, third], int8)  # the floor's weights are good under the third policy
    net, check, action = _keep_floor(_floor_run(False, logged), floor, _PolicyNet([], pick), pick,
                                     _ranked(pick, second, third), methods, None)
    assert action.action == "next policy" and action.shipped_method == "smpq #3" and net.bits == third
    assert not check.below_floor
    assert [t["method"] for t in action.tried] == ["smpq #2", "smpq #3"]
    assert [m.method for m in methods] == ["smpq #2", "smpq #3"]


def test_below_the_floor_with_nothing_better_ships_the_best_and_says_so():
    from smpq_edge.search.runner import _keep_floor

    int8, pick, second = _policy(8, 8), _policy(4, 4), _policy(4, 8)
    logged, methods = [], []
    net, check, action = _keep_floor(_floor_run(False, logged), _PolicyNet([int8], int8), _PolicyNet([], pick),
                                     pick, _ranked(pick, second), methods, None)
    assert action.action == "best below floor" and check.below_floor
    assert logged[-1].startswith("WARNING: SMPQ's pick (4 4)")
    assert "int8 is over the flash budget" in logged[-1] and "fewer bits in a int4 (saves 400 B), b int4" in logged[-1]


def test_floor_sentence_is_one_text_for_the_summary_and_the_report():
    from smpq_edge.common.records import FloorCheck

    below = FloorCheck(floor_val_acc=0.9, shipped_val_acc=0.8, standard_error=0.01, below_floor=True)
    assert below.sentence(CLASSIFICATION).startswith("WARNING: The shipped model is BELOW the int8 floor")
    assert below.sentence(CLASSIFICATION, warning="**WARNING:** ").startswith("**WARNING:** The shipped model is BELOW")
    above = FloorCheck(floor_val_acc=0.8, shipped_val_acc=0.9, standard_error=0.01, below_floor=False)
    assert above.sentence(CLASSIFICATION) == f"{above.verdict(CLASSIFICATION)[0].upper()}{above.verdict(CLASSIFICATION)[1:]}."
