"""Property tests: INT4 packing against a bit-level oracle, the budgeted selector's monotonicity and
bounds, and the board loader under random mutation of a valid board."""

from __future__ import annotations

import copy
import itertools
import re

import numpy as np
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smpq_edge.inputs.boards import BOARDS_DIR, Board, parse_board
from smpq_edge.common.errors import UserError
from smpq_edge.export.int4 import pack_int4, unpack_int4
from smpq_edge.search.select import k_best, select

# ---- INT4 packing ---------------------------------------------------------------------------------


def oracle_pack(values) -> bytes:
    """Written from the TFLM rule, bit by bit: element 2i in bits 0-3 of byte i, element 2i+1 in
    bits 4-7, each the 4-bit two's complement of the value; an odd count leaves bits 4-7 zero."""
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    out = bytearray((len(flat) + 1) // 2)
    for i, v in enumerate(flat):
        assert -8 <= v <= 7
        nibble = v + 16 if v < 0 else v  # two's complement in 4 bits
        for bit in range(4):
            if (nibble >> bit) & 1:
                out[i // 2] |= 1 << (bit + 4 * (i % 2))
    return bytes(out)


def oracle_unpack(data: bytes, count: int) -> list[int]:
    values = []
    for i in range(count):
        nibble = (data[i // 2] >> (4 * (i % 2))) % 16
        values.append(nibble - 16 if nibble & 0b1000 else nibble)
    return values


int4_arrays = st.sampled_from([np.int8, np.int16, np.int32, np.int64]).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
                             elements=st.integers(-8, 7)))


@settings(deadline=None, max_examples=300)
@given(int4_arrays)
def test_int4_pack_matches_the_bit_level_oracle_and_round_trips(values):
    packed = pack_int4(values)
    assert len(packed) == -(-values.size // 2)  # ceil(n / 2)
    assert packed == oracle_pack(values)
    restored = unpack_int4(packed, values.size)
    assert restored.dtype == np.int8 and restored.shape == (values.size,)
    np.testing.assert_array_equal(restored.reshape(values.shape), values)
    if values.size % 2:
        assert packed[-1] >> 4 == 0  # the unused last high nibble is 0


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=64), st.data())
def test_int4_unpack_matches_the_oracle_on_any_bytes(data, draw):
    count = draw.draw(st.integers(0, 2 * len(data)))
    restored = unpack_int4(data, count)
    assert restored.tolist() == oracle_unpack(data, count)
    # Packing what was read gives the bytes back, up to the unused nibble of an odd count.
    repacked = pack_int4(restored)
    expected = bytearray(data[: (count + 1) // 2])
    if count % 2:
        expected[-1] &= 0x0F
    assert repacked == bytes(expected)


@settings(deadline=None, max_examples=100)
@given(st.lists(st.integers(-8, 7), min_size=2, max_size=40), st.data())
def test_int4_nibble_positions(values, draw):
    """Changing element j changes exactly the nibble (j // 2, low if j even) and nothing else."""
    j = draw.draw(st.integers(0, len(values) - 1))
    other = draw.draw(st.integers(-8, 7).filter(lambda v: v != values[j]))
    before = pack_int4(np.array(values, np.int8))
    changed = list(values)
    changed[j] = other
    after = pack_int4(np.array(changed, np.int8))
    diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert diff == [j // 2]
    mask = 0x0F if j % 2 == 0 else 0xF0
    assert (before[j // 2] ^ after[j // 2]) & ~mask & 0xFF == 0
    assert (after[j // 2] & mask) >> (4 * (j % 2)) == other % 16


@settings(deadline=None, max_examples=100)
@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
                  elements=st.integers(-2**40, 2**40)))
def test_int4_out_of_range_is_refused(values):
    assume(values.min() < -8 or values.max() > 7)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(values)


@settings(deadline=None, max_examples=50)
@given(st.binary(max_size=16), st.integers(1, 40))
def test_int4_unpack_refuses_too_few_bytes(data, extra):
    with pytest.raises(ValueError):
        unpack_int4(data, 2 * len(data) + extra)


# ---- the budgeted selector ------------------------------------------------------------------------


@st.composite
def problems(draw, max_layers=4):
    """Small selection problems with integer costs (budgets land exactly on totals) and named dims."""
    n_layers = draw(st.integers(1, max_layers))
    n_dims = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 3)) for _ in range(n_layers)]
    scores = [[draw(st.integers(-20, 20)) / 4 for _ in range(k)] for k in sizes]
    costs = [np.array([[draw(st.integers(0, 30)) for _ in range(n_dims)] for _ in range(k)], dtype=float)
             for k in sizes]
    aggregate = [draw(st.sampled_from(["sum", "max"])) for _ in range(n_dims)]
    budgets = [draw(st.none() | st.integers(0, 30 * n_layers)) for _ in range(n_dims)]
    return scores, costs, budgets, aggregate


def totals(costs, choice, aggregate):
    chosen = np.array([costs[l][k] for l, k in enumerate(choice)])
    return [chosen[:, j].max() if how == "max" else chosen[:, j].sum() for j, how in enumerate(aggregate)]


def best_or_none(scores, costs, budgets, aggregate):
    try:
        return select(scores, costs, budgets, aggregate=aggregate)
    except UserError:
        return None


@settings(deadline=None, max_examples=120)
@given(problems(), st.data())
def test_loosening_a_budget_never_lowers_the_best_score(problem, data):
    scores, costs, budgets, aggregate = problem
    j = data.draw(st.integers(0, len(budgets) - 1))
    looser = list(budgets)
    looser[j] = None if budgets[j] is None or data.draw(st.booleans()) else budgets[j] + data.draw(st.integers(1, 40))
    tight, loose = best_or_none(scores, costs, budgets, aggregate), best_or_none(scores, costs, looser, aggregate)
    if tight is not None:
        assert loose is not None  # what fits the tighter budgets fits the looser ones
        assert loose.score >= tight.score - 1e-6


def k_best_or_none(problem, k: int):
    """The k best selections, or None when nothing fits (k_best raises UserError then)."""
    scores, costs, budgets, aggregate = problem
    try:
        return k_best(scores, costs, budgets, k, aggregate=aggregate)
    except UserError:
        return None


@settings(deadline=None, max_examples=80)
@given(problems(), st.integers(1, 8))
def test_every_selection_of_k_best_is_within_every_budget(problem, k):
    scores, costs, budgets, aggregate = problem
    found = k_best_or_none(problem, k)
    if found is None:
        return
    assert 1 <= len(found) <= k
    assert [s.score for s in found] == sorted((s.score for s in found), reverse=True)
    assert len({s.choice for s in found}) == len(found)
    for selection in found:
        exact = totals(costs, selection.choice, aggregate)
        assert list(selection.cost) == exact
        for total, budget in zip(exact, budgets):
            assert budget is None or total <= budget


@settings(deadline=None, max_examples=60)
@given(problems(), st.integers(1, 5))
def test_k_best_is_a_prefix_of_k_plus_one_best(problem, k):
    shorter = k_best_or_none(problem, k)
    if shorter is None:
        return
    longer = k_best_or_none(problem, k + 1)
    assert len(longer) >= len(shorter)
    np.testing.assert_allclose([s.score for s in longer[: len(shorter)]], [s.score for s in shorter], atol=1e-6)


@settings(deadline=None, max_examples=60)
@given(problems(), st.integers(2, 7), st.integers(-5, 5), st.data())
def test_scaling_costs_and_shifting_a_layer_keep_the_optimum(problem, factor, shift, data):
    scores, costs, budgets, aggregate = problem
    base = best_or_none(scores, costs, budgets, aggregate)
    scaled = best_or_none(scores, [c * factor for c in costs], [None if b is None else b * factor for b in budgets],
                          aggregate)
    layer = data.draw(st.integers(0, len(scores) - 1))
    shifted_scores = [[s + shift if l == layer else s for s in row] for l, row in enumerate(scores)]
    shifted = best_or_none(shifted_scores, costs, budgets, aggregate)
    if base is None:
        assert scaled is None and shifted is None
        return
    assert scaled.score == pytest.approx(base.score, abs=1e-6)
    assert shifted.score == pytest.approx(base.score + shift, abs=1e-6)


@settings(deadline=None, max_examples=80)
@given(problems())
def test_infeasible_message_names_each_budget_and_its_smallest_value(problem):
    scores, costs, budgets, aggregate = problem
    names = [f"dim{j}" for j in range(len(budgets))]
    try:
        select(scores, costs, budgets, aggregate=aggregate, names=names)
    except UserError as exc:
        message = str(exc)
    else:
        return
    assert "\n" not in message
    every = [totals(costs, choice, aggregate) for choice in itertools.product(*(range(len(s)) for s in scores))]
    for j, (name, budget) in enumerate(zip(names, budgets)):
        if budget is None:
            assert f"{name} " not in message
            continue
        match = re.search(rf"{name} (\d+) \(budget (\d+)\)", message)
        assert match, message
        assert int(match.group(1)) == min(t[j] for t in every)  # each dimension's minimum on its own
        assert int(match.group(2)) == budget


# ---- the board loader ----------------------------------------------------------------------------

GOOD = yaml.safe_load((BOARDS_DIR / "nucleo-l4r5zi.yaml").read_text())
SOURCE = "mutated-board.yaml"


def _paths(tree: dict, prefix=()) -> list[tuple[str, ...]]:
    found = []
    for key, value in tree.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found += _paths(value, (*prefix, key))
    return found


def _node(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


FIELD_PATHS = _paths(GOOD)
MAPPING_PATHS = [()] + [p for p in FIELD_PATHS if isinstance(_node(GOOD, p), dict)]
# A text without line breaks of any kind (str.splitlines also splits on \x85, \u2028, ...).
line_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30)
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 5000), line_text,
    st.sampled_from(["cortex-m4", "cortex-m0plus", "reference", "cmsis_nn", "w4a8", "w8a8", "nan", "1e300"]),
    st.lists(st.sampled_from(["w4a8", "w8a8", "w2a8", 4]), max_size=3),
    st.dictionaries(st.sampled_from(["w8", "w4", "per_op", "per_element", "flash_kb", "x"]), st.floats(0, 100),
                    max_size=3),
)


@st.composite
def mutated_boards(draw):
    board = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELD_PATHS))
        try:
            parent = _node(board, path[:-1])
        except (KeyError, TypeError):
            continue  # an earlier mutation replaced or removed this field's parent
        if not isinstance(parent, dict):
            continue
        if draw(st.integers(0, 4)) == 0:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(values)
    return board


def _check_board_equals(board: Board, expected: dict) -> None:
    # What the file set: optional fields (candidates, a formula's unused terms) keep their defaults.
    assert board.model_dump(mode="json", exclude_unset=True) == expected


@settings(deadline=None, max_examples=300)
@given(mutated_boards())
def test_a_mutated_board_loads_exactly_or_fails_with_one_line(board):
    text = yaml.safe_dump(board, sort_keys=False, allow_unicode=True)
    expected = yaml.safe_load(text)  # what the YAML says, which the loader must reproduce
    try:
        loaded = parse_board(text, SOURCE)
    except UserError as exc:
        message = str(exc)
        assert message.startswith(f"{SOURCE}: ") and len(message.splitlines()) == 1, message
        return
    _check_board_equals(loaded, expected)


@settings(deadline=None, max_examples=150)
@given(st.sampled_from(MAPPING_PATHS), line_text.filter(lambda k: k.strip() != ""), st.data())
def test_an_unknown_key_is_refused_by_name(path, key, data):
    board = copy.deepcopy(GOOD)
    parent = _node(board, path)
    assume(key not in parent and key != "<<")
    parent[key] = data.draw(values)
    text = yaml.safe_dump(board, sort_keys=False, allow_unicode=True)
    assume(_node(yaml.safe_load(text), path).get(key, KeyError) is not KeyError)  # YAML kept it as a string key
    with pytest.raises(UserError) as info:
        parse_board(text, SOURCE)
    message = str(info.value)
    # cycles maps kernel variants to formulas: an unknown key there is an unknown variant.
    expected = "not a kernel variant" if path == ("cycles",) else "unknown field"
    assert message.startswith(f"{SOURCE}: {'.'.join((*path, key))}: {expected}"), message


@settings(deadline=None, max_examples=60)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_board_file_fail_cleanly(raw):
    text = raw.decode("utf-8", errors="replace")
    try:
        parse_board(text, SOURCE)
    except UserError as exc:
        assert str(exc).startswith(f"{SOURCE}: ") and len(str(exc).splitlines()) == 1
    else:
        pytest.fail("random bytes made a valid board")
