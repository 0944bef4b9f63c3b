"""The host-free engine: strategies, plans, groups, cost model, schedule matching.  No ComfyUI here."""
import pytest

from fasterdiffusion import (GRAMMAR, PAPER_KEYS_50, StrategyError, make_plan, match_step, parse_strategy,
                             predicted_cost_fraction)
from fasterdiffusion.strategy import IF_PRESETS


def test_paper_50_is_the_papers_list_and_groups():
    plan = make_plan("paper", 50)
    assert plan.keys == PAPER_KEYS_50 == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert plan.group_sizes == [1, 1, 1, 2, 5, 5, 10, 10, 15]
    assert plan.groups[4] == (5, 6, 7, 8, 9)


def test_paper_fewer_steps_is_the_truncated_list():
    assert make_plan("paper", 20).keys == (0, 1, 2, 3, 5, 10, 15)     # the paper's DPM-Solver-20 set
    assert make_plan("paper", 20).group_sizes == [1, 1, 1, 2, 5, 5, 5]
    assert make_plan("paper", 4).keys == (0, 1, 2, 3)
    assert make_plan("paper", 1).keys == (0,)


def test_paper_more_steps_stretches_and_stays_dense_early():
    keys = make_plan("paper", 100).keys
    assert keys[:4] == (0, 1, 2, 3)
    assert keys[4:] == (4, 6, 10, 20, 30, 50, 70)
    gaps = [b - a for a, b in zip(keys, keys[1:])]
    assert gaps == sorted(gaps), "keys get sparser towards the end"


def test_if_presets_at_their_native_step_counts():
    """The official code's rules (utils_if.py): stage I 100ls, stage II register_if2, the x4 upscaler's "pro"."""
    assert make_plan("if1", 100).keys == tuple([*range(10), *range(10, 86, 5), *range(86, 100)])
    assert make_plan("if2", 50).keys == tuple([*range(20), *range(20, 41, 2), *range(41, 50)])
    assert make_plan("if3", 75).keys == (0, 2, 5, 9, 14, 20, 27, 35, 44, 54, 65)
    assert make_plan("if1", 100).group_sizes == [1] * 10 + [5] * 15 + [1] * 15
    assert make_plan("if2", 50).group_sizes == [1] * 20 + [2] * 10 + [1] * 10


def test_if_presets_move_to_other_step_counts():
    """Each native key k of M steps moves to round(k * N / M): at twice the steps the count stays and the dense runs
    become every other step; at half they stay dense and keys that meet merge."""
    for name, (native, keys) in IF_PRESETS.items():
        assert make_plan(name, 2 * native).keys == tuple(2 * k for k in keys), name
        half = make_plan(name, native // 2).keys
        assert set(half) == {round(k * (native // 2) / native) for k in keys} - {native // 2}, name
    assert make_plan("if1", 50).keys[:6] == (0, 1, 2, 3, 4, 5) and make_plan("if1", 50).keys[-8:] == tuple(range(42, 50))
    assert make_plan("if3", 25).keys == (0, 1, 2, 3, 5, 7, 9, 12, 15, 18, 22)
    assert make_plan("if2", 10).keys == tuple(range(10)) and make_plan("if1", 1).keys == (0,)


def test_uniform_all_and_lists():
    assert make_plan("uniform:4", 10).keys == (0, 4, 8)
    assert make_plan(" Uniform:1 ", 3).keys == (0, 1, 2)
    assert make_plan("all", 5).group_sizes == [1] * 5
    plan = make_plan("0, 1,2,3,5,10", 8)
    assert plan.keys == (0, 1, 2, 3, 5) and plan.ignored == (10,)
    assert make_plan("3,0,3", 5).keys == (0, 3)


def test_every_step_in_exactly_one_group():
    for s in ("paper", "uniform:3", "all", "0,2,7", "if1", "if2", "if3"):
        for n in (1, 2, 7, 20, 50, 77, 100, 151):
            plan = make_plan(s, n)
            flat = [i for g in plan.groups for i in g]
            assert flat == list(range(n))
            assert all(g[0] in plan.keys for g in plan.groups)
            assert plan.group_of(n - 1) == plan.groups[-1]


@pytest.mark.parametrize("bad,problem", [
    ("", "neither a known name"), ("fast", "'fast' is neither"), ("uniform", "whole number"),
    ("uniform:0", "K >= 1"), ("uniform:x", "whole number"), ("1,2,3", "step 0 must be a key step"),
    ("0,-1", "'-1' is neither"), ("0,1.5", "'1.5' is neither"), ("if4", "'if4' is neither"),
    ("if1:2", "'if1:2' is neither"),
])
def test_bad_strings_name_the_problem_and_show_the_grammar(bad, problem):
    with pytest.raises(StrategyError) as e:
        parse_strategy(bad)
    assert problem in str(e.value)
    assert GRAMMAR in str(e.value)
    assert repr(bad) in str(e.value)


def test_strategy_round_trips_as_text():
    for s in ("paper", "all", "uniform:4", "0,1,2,3,5,10", "if1", "if2", "if3"):
        assert str(parse_strategy(s)) == s
    assert str(parse_strategy(" IF2\t")) == "if2"


def test_cost_model():
    plan = make_plan("paper", 50)
    assert predicted_cost_fraction(plan, 0.31) == pytest.approx((9 + 41 * 0.69) / 50)
    assert predicted_cost_fraction(make_plan("all", 50), 0.31) == 1.0
    # parallel with linear batch cost saves exactly the encoder FLOPs, like sequential
    assert predicted_cost_fraction(plan, 0.31, parallel=True) == pytest.approx(predicted_cost_fraction(plan, 0.31))
    # with a flat batch cost (GPU eager) a group costs one encoder + one decoder call
    flat = predicted_cost_fraction(plan, 0.42, parallel=True, batch_cost=lambda w: 1.0)
    assert flat == pytest.approx(9 / 50)


def test_match_step():
    sched = [14.6, 7.0, 3.1, 1.0, 0.0]
    assert match_step(sched, 14.6) == 0
    assert match_step(sched, 3.1 * (1 + 1e-6)) == 2
    assert match_step(sched, 5.0) is None        # a midpoint (DPM2-type samplers)
    assert match_step(sched, 0.0) is None        # the final sigma is never a model step


# ------------------------------------------------------------------------------------- calibration

def _drift(n, seed=0):
    """A drift matrix shaped like real ones: features change fast early, slowly late, plus noise."""
    import random
    rng = random.Random(seed)
    speed = [1.0 / (1 + i) + 0.05 * rng.random() for i in range(n)]
    cum = [sum(speed[:i]) for i in range(n)]
    return [[(cum[j] - cum[a]) ** 2 if j > a else 0.0 for j in range(n)] for a in range(n)]


def test_choose_keys_is_optimal_and_deterministic():
    import itertools
    from fasterdiffusion import choose_keys, plan_drift
    n = 9
    d = _drift(n, seed=3)
    for k in range(1, n + 1):
        keys = choose_keys(d, n, k)
        assert keys[0] == 0 and len(keys) == k and keys == sorted(set(keys))
        brute = min(plan_drift(d, (0,) + rest, n) for rest in itertools.combinations(range(1, n), k - 1))
        assert abs(plan_drift(d, keys, n) - brute) < 1e-12
        assert choose_keys(d, n, k) == keys
    assert choose_keys(d, n, n) == list(range(n)) and plan_drift(d, range(n), n) == 0


def test_calibrated_beats_uniform_and_paper_at_the_same_budget():
    from fasterdiffusion import choose_keys, keys_for_cost, plan_drift, predicted_cost_fraction
    n = 50
    d = _drift(n)
    paper = make_plan("paper", n)
    cal = choose_keys(d, n, len(paper.keys))
    assert plan_drift(d, cal, n) <= plan_drift(d, paper.keys, n)
    for k in (2, 4, 5, 10):
        uniform = make_plan(f"uniform:{k}", n).keys
        assert plan_drift(d, choose_keys(d, n, len(uniform)), n) <= plan_drift(d, uniform, n)
    keys = keys_for_cost(d, n, 0.75, 0.31)
    cost = predicted_cost_fraction(make_plan(",".join(map(str, keys)), n), 0.31)
    assert cost <= 0.75 and predicted_cost_fraction(make_plan(",".join(map(str, choose_keys(d, n, len(keys) + 1))), n), 0.31) > 0.75


# ------------------------------------------------------------------------------------- hostile strings

@pytest.mark.parametrize("bad", ["0,²", "uniform:²", "0,١", "uniform:٣", "0,1\u00a0", "0,+1", "0,1_0", "uniformly:3"])
def test_only_ascii_digits_and_whitespace(bad):
    """str.isdigit accepts '²' and Arabic-Indic digits: they must give the grammar, not a crash in int()."""
    with pytest.raises(StrategyError) as e:
        parse_strategy(bad)
    assert "invalid FasterDiffusion strategy" in str(e.value) and GRAMMAR in str(e.value)


def test_error_messages_echo_a_shortened_input():
    long = "0," + "x" * 20000
    with pytest.raises(StrategyError) as e:
        parse_strategy(long)
    message = str(e.value)
    assert len(message) < len(GRAMMAR) + 300, "the echoed input is cut"
    assert "…" in message and GRAMMAR in message


@pytest.mark.parametrize("text", ["0," + "9" * 5000, "uniform:" + "9" * 5000, "0,100001", "uniform:100001"])
def test_huge_indices_are_a_strategy_error(text):
    """Beyond any real step count; 5000 digits would hit Python's integer-string limit in int()."""
    with pytest.raises(StrategyError) as e:
        parse_strategy(text)
    assert "100000" in e.value.problem and len(str(e.value)) < len(GRAMMAR) + 300


def test_indices_up_to_the_bound_and_leading_zeros_are_fine():
    assert parse_strategy("0,100000").steps == (0, 100000)
    assert parse_strategy("0,000000000000000000007").steps == (0, 7)
    assert parse_strategy("uniform:0004").every == 4
    assert parse_strategy("UNIFORM : 4").every == 4 and parse_strategy("\t0 ;1\n").steps == (0, 1)


def test_with_keys_splits_groups_and_keeps_the_name():
    plan = make_plan("paper", 20).with_keys([7, 3, 25])          # 3 is a key already; 25 is past the end
    assert plan.keys == (0, 1, 2, 3, 5, 7, 10, 15) and plan.strategy == "paper"
    assert plan.group_of(6) == (5, 6) and plan.group_of(9) == (7, 8, 9)
