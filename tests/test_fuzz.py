"""Fuzzing the strategy grammar and the plan with Hypothesis.

* Python (fasterdiffusion/strategy.py) and the editor's JavaScript (web/js/strategy.js) read every generated
  string the same way: the same key steps at every step count, or both refuse it with the same problem.
* Every plan covers each step exactly once, in groups that each start with a key step, step 0 first, and
  its predicted cost lies in (0, 1].

The JavaScript runs in one node process for the whole module, fed batches of strings over a pipe.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import testmodel as tm
from fasterdiffusion import StrategyError, make_plan, parse_strategy, predicted_cost_fraction

STEP_COUNTS = (1, 2, 7, 20, 49, 50, 51, 137)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NODE_LOOP = """
import * as s from %s;
import readline from "node:readline";
function read(text, steps) {
  try {
    const strategy = s.parseStrategy(text);
    return { keys: steps.map((n) => s.keySteps(strategy, n)),
             cost: steps.map((n) => s.predictedCost(s.keySteps(strategy, n), n).flops) };
  } catch (e) {
    return e instanceof s.StrategyError ? { error: e.message } : { crash: String(e) };
  }
}
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const { texts, steps } = JSON.parse(line);
  process.stdout.write(JSON.stringify(texts.map((t) => read(t, steps))) + "\\n");
});
"""


@pytest.fixture(scope="module")
def js(tmp_path_factory):
    """read(texts) -> the editor's reading of each text, from one long-lived node process."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    module = tmp_path_factory.mktemp("js") / "strategy.mjs"
    shutil.copy(tm.REPO / "web" / "js" / "strategy.js", module)
    proc = subprocess.Popen([node, "--input-type=module", "-e", NODE_LOOP % json.dumps(module.as_uri())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def read(texts):
        proc.stdin.write(json.dumps({"texts": texts, "steps": STEP_COUNTS}).encode() + b"\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, "the node process died"
        return json.loads(line)
    yield read
    proc.stdin.close()
    proc.wait(10)


def python_reading(text):
    try:
        strategy = parse_strategy(text)
    except StrategyError as e:
        return {"error": e.problem}
    return {"keys": [list(make_plan(strategy, n).keys) for n in STEP_COUNTS]}


# ------------------------------------------------------------------------------------- generated strings

def mixed_case(word):
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda up: "".join(c.upper() if u else c for c, u in zip(word, up)))


# ASCII whitespace (accepted) and look-alikes that are whitespace to Python's str.strip or JavaScript's trim
space = st.sampled_from(["", " ", "  ", "\t", "\n", "\r\n", "\f", "\v", "\u00a0", "\u2003", "\ufeff", "\x1c",
                         "\x85", "\u2028", "\u3000"]) | st.text(alphabet=" \t\n", max_size=3)
number = st.one_of(
    st.integers(0, 120).map(str),
    st.integers(0, 10 ** 30).map(str),                                  # past the bound, any size
    st.tuples(st.integers(0, 30), st.integers(0, 99)).map(lambda t: "0" * t[0] + str(t[1])),  # leading zeros
    st.just("9" * 5000),                                               # Python's integer-string limit
    st.sampled_from(["²", "³", "١", "۴", "߀", "०", "১", "๑", "０", "１٢", "1²", "-1", "+1", "1.5", "1_0", "1e3",
                     "0x1", "Ⅻ", "", " "]),
)
uniform = st.builds(lambda name, a, b, k, c: name + a + ":" + b + k + c,
                    mixed_case("uniform") | st.sampled_from(["uniformly", "uni form", "unıform", "uniform:"]),
                    space, space, number, space)
sep = st.sampled_from([",", ";", " , ", ",,", ", ", "，", "、"])
step_list = st.builds(lambda first, rest, seps, a, b: a + "".join(x for pair in zip([first, *rest], seps + [""])
                                                                  for x in pair) + b,
                      st.sampled_from(["0", "00", "1", "0 "]) | number,
                      st.lists(number, max_size=8), st.lists(sep, min_size=8, max_size=8), space, space)
name = st.builds(lambda a, w, b: a + w + b, space, mixed_case("paper") | mixed_case("all") |
                 st.sampled_from(["papers", "al", "pAp3r", "ALL!", "pap er"]), space)
strategy_text = st.one_of(name, uniform, step_list, st.text(max_size=30),
                          st.text(alphabet="0123456789,;: \tuniformpaerlUNIFORMPAPERALL²١", max_size=40))


@FUZZ
@given(st.lists(strategy_text, min_size=1, max_size=40))
def test_python_and_javascript_read_every_string_the_same(js, texts):
    for text, theirs in zip(texts, js(texts)):
        assert "crash" not in theirs, (text, theirs)
        ours = python_reading(text)
        assert theirs.get("keys") == ours.get("keys") and theirs.get("error") == ours.get("error"), text
        if "error" in ours:
            assert len(ours["error"]) < 200, "the problem quotes a shortened input"


# ------------------------------------------------------------------------------------- plans

valid_strategy = st.one_of(
    st.sampled_from(["paper", "all"]),
    st.integers(1, 300).map(lambda k: f"uniform:{k}"),
    st.lists(st.integers(1, 400), max_size=30).map(lambda ks: ",".join(map(str, [0, *ks]))),
)


@FUZZ
@given(valid_strategy, st.integers(1, 400), st.floats(0.0, 0.99), st.booleans())
def test_plans_cover_every_step_once_key_zero_first_and_cost_at_most_one(text, n, share, parallel):
    plan = make_plan(text, n)
    assert [i for g in plan.groups for i in g] == list(range(n)), "every step in exactly one group, in order"
    assert plan.keys[0] == 0 and plan.groups[0][0] == 0
    assert tuple(g[0] for g in plan.groups) == plan.keys, "each group starts with its key step"
    assert all(plan.group_of(i)[0] <= i for i in range(0, n, max(1, n // 7)))
    assert set(plan.ignored) == {k for k in parse_strategy(text).steps if k >= n}
    for cost in (predicted_cost_fraction(plan, share, parallel),
                 predicted_cost_fraction(plan, share, parallel=True, batch_cost=lambda w: 1.0)):
        assert 0.0 < cost <= 1.0 + 1e-12, (text, n, share, parallel, cost)


@FUZZ
@given(st.lists(valid_strategy, min_size=1, max_size=20))
def test_the_editor_predicts_the_same_flops(js, texts):
    for text, theirs in zip(texts, js(texts)):
        for n, cost in zip(STEP_COUNTS, theirs["cost"]):
            assert 0.0 < cost <= 1.0 + 1e-12
            assert cost == pytest.approx(predicted_cost_fraction(make_plan(text, n), 0.31)), (text, n)
