"""Issue 21 item 4: with controlnet_reuse and forecast propagation, should the kept ControlNet residuals be forecast
too, like the encoder features?  Latent relative error to the full run (ComfyUI, the digits model with the
random-weight test ControlNet / T2I-Adapter / Control-LoRA of tests/test_controlnet.py, euler 20 steps, three
digits, sequential decoders) for reuse, forecast (features only: what the pack does), and forecast with the
residuals extrapolated by the same weights (done here by wrapping the engine's extrapolate; not in the pack).

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/controlnet_residual_study.py

Result (docs/quality/controlnet_forecast.md): forecasting the residuals too helped a ControlNet with dense
keys, hurt it with sparse keys and hurt a Control-LoRA at both; a T2I-Adapter has no decoder-side residuals.
So the pack forecasts the features and keeps reusing the residuals.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import copy, math, torch, tempfile
import conftest
import testmodel as tm
tm.boot_comfy(); torch.set_num_threads(1)
from types import SimpleNamespace
import conftest, test_controlnet as tc
from importlib import import_module
Apply, cu = tm.load_pack(tempfile.mkdtemp())
pack = SimpleNamespace(Apply=Apply, cu=cu)
pkg = cu.__name__.rsplit(".", 3)[0]
fc = import_module(pkg + ".fasterdiffusion.forecast")
rt = import_module(pkg + ".fasterdiffusion.runtime")
orig = fc.extrapolate
MODE = {"residuals": False}

def extrapolate(f, history, step, timesteps=None, sigmas=None):
    out = orig(f, history, step, timesteps, sigmas)
    if not MODE["residuals"] or out is history[-1][1]:
        return out
    used = history[-(f.order + 1):]
    us = [float(k) for k, _ in used]
    ws = fc.weights(us, float(step))
    newest = used[-1][1].meta
    if newest.controls is None:
        return out
    new_controls = []
    for member, res in newest.controls:
        olds = []
        for _, feats in used[:-1]:
            match = [r for m, r in (feats.meta.controls or []) if m is member]
            olds.append(match[0] if match else None)
        if any(o is None for o in olds):
            new_controls.append((member, res)); continue
        combined = {}
        for part, tensors in res.items():
            lst = []
            for i, t in enumerate(tensors):
                if t is None or any(i >= len(o.get(part, [])) or o[part][i] is None or o[part][i].shape != t.shape for o in olds):
                    lst.append(t); continue
                acc = t
                for w, o in zip(ws, olds):
                    acc = acc + w * (o[part][i] - t)
                lst.append(acc)
            combined[part] = lst
        new_controls.append((member, combined))
    meta = copy.copy(newest); meta.controls = new_controls
    return rt.Features(out.skips, out.mid, meta)

rt.extrapolate = extrapolate
model, tok = tm.load_test_model()
print("| control | strategy | reuse | forecast (features) | forecast (features + residuals) |")
print("|---|---|---|---|---|")
for kind in ("controlnet", "t2i_adapter", "control_lora"):
    for strategy in ("uniform:3", "uniform:5"):
        net = tc.MAKERS[kind]()
        res = {}
        for digit in (3, 5, 8):
            conds = tc.controlled(tok, (net, 0.9, 0.0, 1.0), digit=digit)
            base = tc.run(model, conds)
            for name, prop, resid in (("reuse", "reuse", False), ("forecast", "forecast", False), ("forecast+res", "forecast", True)):
                MODE["residuals"] = resid
                out = tc.run(conftest.apply(pack, model, strategy, False, 32, propagation=prop)[0], conds)
                res.setdefault(name, []).append(tc.rel(out, base))
        mean = {k: sum(v) / len(v) for k, v in res.items()}
        print(f"| {kind} | `{strategy}` | {mean['reuse']:.4f} | {mean['forecast']:.4f} | {mean['forecast+res']:.4f} |",
              flush=True)
