"""The editor's JavaScript strategy rules (web/js/strategy.js) agree with the Python engine."""
import json
import shutil
import subprocess

import pytest

from fasterdiffusion import StrategyError, make_plan, parse_strategy

CASES = [(s, n) for s in ("paper", "all", "uniform:1", "uniform:3", "uniform:4", "0,1,2,3,5,10", "0,7,30,60", "if1",
                          "if2", "if3")
         for n in (1, 2, 4, 10, 20, 25, 49, 50, 51, 75, 100, 151)]
BAD = ["", "fast", "uniform", "uniform:0", "1,2,3", "0,-1", "0,1.5",
       # hostile: non-ASCII digits and spaces, names with a suffix, huge numbers, very long input
       "0,²", "uniform:²", "0,١", "0,1\u00a0", "0,1\ufeff", "uniformly:3", "0,100001", "uniform:100001",
       "0," + "9" * 5000, "0," + "x" * 20000,
       # preset names alike but not equal
       "if", "if4", "if0", "if 1", "if1:2", "if1,5", "constructor", "toString"]
GOOD = ["UNIFORM : 4", "\t0 ;1\n", "0,000000000000000000007", "0,100000", "uniform:100000", "IF1", " if2\t", "If3"]


def run_js(tmp_path, body):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    module = tmp_path / "strategy.mjs"
    shutil.copy(__import__("testmodel").REPO / "web" / "js" / "strategy.js", module)
    script = f"import * as s from {json.dumps(module.as_uri())};\n{body}"
    out = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_key_steps_match_python(tmp_path):
    js = run_js(tmp_path, f"console.log(JSON.stringify({json.dumps(CASES)}.map(([t, n]) => s.keySteps(t, n))));")
    for (text, n), keys in zip(CASES, js):
        assert tuple(keys) == make_plan(text, n).keys, (text, n)


def test_gpu_time_prediction_matches_python(tmp_path):
    """The Calibrate node's gpu_time budget and the editor's cost readout are one cost model."""
    from fasterdiffusion import predicted_gpu_fraction
    js = run_js(tmp_path, f"console.log(JSON.stringify({json.dumps(CASES)}.map(([t, n]) => s.predictedCost(s.keySteps(t, n), n).gpu)));")
    for (text, n), gpu in zip(CASES, js):
        assert predicted_gpu_fraction(make_plan(text, n)) == pytest.approx(gpu, rel=1e-12), (text, n)


def test_bad_strings_are_refused_by_both(tmp_path):
    js = run_js(tmp_path, f"""console.log(JSON.stringify({json.dumps(BAD)}.map((t) => {{
        try {{ s.parseStrategy(t); return null; }} catch (e) {{ return e.message; }} }})));""")
    for text, message in zip(BAD, js):
        with pytest.raises(StrategyError) as e:
            parse_strategy(text)
        assert message is not None and message == e.value.problem, text


def test_edge_strings_read_the_same_in_both(tmp_path):
    js = run_js(tmp_path, f"console.log(JSON.stringify({json.dumps(GOOD)}.map((t) => s.keySteps(t, 8))));")
    for text, keys in zip(GOOD, js):
        assert tuple(keys) == make_plan(text, 8).keys, text


def test_editor_names_preset_key_sets(tmp_path):
    """A key set the editor's cells produce that equals a preset at this step count is shown by the preset's name."""
    cases = [(make_plan(name, n).keys, n) for name, n in (("if1", 100), ("if2", 50), ("if3", 75), ("if3", 30))]
    js = run_js(tmp_path, f"console.log(JSON.stringify({json.dumps(cases)}.map(([k, n]) => s.strategyFor(k, n))));")
    assert js == ["if1", "if2", "if3", "if3"]


def test_shared_documents_round_trip_and_malformed_ones_are_refused(tmp_path):
    js = run_js(tmp_path, """
        const doc = s.toShareable("paper", 20, "my preset");
        const errors = ["{", "[]", '{"key_steps": [1, 2]}', '{"key_steps": "0,1"}', '{"key_steps": [0, 1.5]}']
          .map((t) => { try { s.fromShareable(t); return null; } catch (e) { return e.message; } });
        console.log(JSON.stringify({doc, back: s.fromShareable(JSON.stringify(doc)), errors,
                                    strategyOnly: s.fromShareable('{"strategy": "uniform:3"}')}));""")
    assert js["doc"]["key_steps"] == [0, 1, 2, 3, 5, 10, 15] and js["doc"]["steps"] == 20
    assert js["back"] == "0,1,2,3,5,10,15" and js["strategyOnly"] == "uniform:3"
    assert all(js["errors"]), js["errors"]
    assert "step 0 must be a key step" in js["errors"][2]


def test_predicted_gpu_time_matches_the_editor(tmp_path):
    """The editor's 'SD1.5 GPU time with parallel decoders' and the engine's predicted_gpu_fraction agree."""
    from fasterdiffusion import predicted_gpu_fraction
    js = run_js(tmp_path, f"console.log(JSON.stringify({json.dumps(CASES)}.map(([t, n]) => "
                          "s.predictedCost(s.keySteps(t, n), n).gpu)));")
    for (text, n), gpu in zip(CASES, js):
        assert predicted_gpu_fraction(make_plan(text, n)) == pytest.approx(gpu, rel=1e-12), (text, n)
    assert predicted_gpu_fraction(make_plan("all", 50)) == pytest.approx(1.0)
    assert 0.2 < predicted_gpu_fraction(make_plan("paper", 50)) < 0.26      # gpu.md: PEP, paper keys 0.232
