"""How much the UNet's encoder and decoder features change from one sampling step to the next (the paper's
Fig. 3 analogue), on both test models.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/feature_dynamics.py [--samples 4] [--out docs]   (~3 min)

One full run per model (euler, 50 steps, CFG 3).  Forward hooks on this tool's own copy of the UNet read the
output of every input block (the skip tensors), the middle block, every output block and the final layer;
per step i >= 1 the relative change ||f_i - f_{i-1}|| / ||f_{i-1}|| of each tensor (cond and uncond rows
together) is averaged over the encoder's skips, over the decoder's blocks, and given alone for the middle
block and the final output.  Writes ``feature_dynamics.png`` and ``feature_dynamics.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("feature_dynamics")
import testmodel as tm  # noqa: E402

STEPS = 50
CFG = 3.0
SERIES = ("encoder", "middle", "decoder", "output")


def relative_change(prev, cur) -> float:
    """||cur - prev|| / ||prev|| (Frobenius norms); 0 for identical tensors."""
    return float((cur.float() - prev.float()).norm() / prev.float().norm().clamp_min(1e-12))


def step_changes(prev: dict, cur: dict) -> dict:
    """Per series, the relative change between two steps' features (``{"in0": t, ..., "mid": t, "out0": t,
    ..., "final": t}``): mean over the skips (in*), the middle block alone, mean over the output blocks
    (out*), the final output alone."""
    def mean(prefix):
        names = [k for k in cur if k.startswith(prefix)]
        return sum(relative_change(prev[k], cur[k]) for k in names) / len(names)
    return {"encoder": mean("in"), "middle": relative_change(prev["mid"], cur["mid"]),
            "decoder": mean("out"), "output": relative_change(prev["final"], cur["final"])}


def thirds(values):
    """Means of the first, middle and last third of a list."""
    n = len(values)
    cuts = [0, round(n / 3), round(2 * n / 3), n]
    return [sum(values[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:])]


class Dynamics:
    """Per step, the features of every block of one run; the relative changes of adjacent steps."""

    def __init__(self, unet, schedule):
        self.schedule, self.step, self.current, self.prev, self.changes = schedule, None, {}, None, []
        # ComfyUI runs a block's layers one by one (forward_timestep_embed): a block's output is its last layer's
        named = [(f"in{i}", m[-1]) for i, m in enumerate(unet.input_blocks)] + [("mid", unet.middle_block[-1])]
        named += [(f"out{i}", m[-1]) for i, m in enumerate(unet.output_blocks)] + [("final", unet.out)]
        self.hooks = [m.register_forward_hook(self.keep(name)) for name, m in named]

    def keep(self, name):
        def hook(module, args, output):
            self.current.setdefault(name, []).append(output.detach().float().clone())
        return hook

    def wrapper(self, executor, x, timesteps, context, y, control, to, **kwargs):
        from fasterdiffusion import match_step
        step = match_step(self.schedule, float(to["sigmas"].flatten()[0]))
        if step != self.step:         # cond and uncond calls of one step land together: a new step begins
            self.finish_step()
            self.step = step
        return executor(x, timesteps, context, y, control, to, **kwargs)

    def finish_step(self):
        if self.current:
            feats = {k: v[0] if len(v) == 1 else __import__("torch").cat(v) for k, v in self.current.items()}
            if self.prev is not None:
                self.changes.append(step_changes(self.prev, feats))
            self.prev, self.current = feats, {}

    def close(self):
        self.finish_step()
        for h in self.hooks:
            h.remove()


def measure(model, sample, steps=STEPS):
    """The per-step changes of one full run of ``sample(model)`` (euler, normal scheduler, ``steps`` steps)."""
    import comfy.patcher_extension
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).tolist()
    dyn = Dynamics(model.model.diffusion_model, sigmas)
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "feature_dynamics", dyn.wrapper)
    try:
        sample(m)
    finally:
        dyn.close()
    return {s: [c[s] for c in dyn.changes] for s in SERIES}


LIKE_SD15 = 2.0   # "encoder gentle, decoder varying": the decoder changes at least this many times as much


def verdict(name, series) -> str:
    """A plain statement: does the encoder change clearly less than the decoder (the paper's SD1.5 finding),
    in which third does it move most, and how the middle block compares."""
    enc, dec, mid = thirds(series["encoder"]), thirds(series["decoder"]), thirds(series["middle"])
    ratios = [d / e for d, e in zip(dec, enc)]
    if all(r >= LIKE_SD15 for r in ratios):
        like = f"behaves like the paper's SD1.5 (encoder gentle, decoder varying: >= {LIKE_SD15:g}x in every third)"
    elif all(r > 1 for r in ratios):
        like = (f"only weakly like the paper's SD1.5: the decoder changes more than the encoder in every third, "
                f"but by less than {LIKE_SD15:g}x")
    else:
        like = ("does not behave like the paper's SD1.5: the encoder changes as much as the decoder or more in the "
                + " and ".join(t for t, r in zip(("first", "middle", "last"), ratios) if r <= 1) + " third")
    where = ["first", "middle", "last"][max(range(3), key=lambda i: enc[i])]
    peak = max(range(len(series["encoder"])), key=lambda i: series["encoder"][i]) + 1
    return (f"**{name}** {like} (decoder/encoder per third: {', '.join(f'{r:.2f}x' for r in ratios)}). The encoder "
            f"moves most in the {where} third (largest single change at step {peak}: {series['encoder'][peak - 1]:.3f}); "
            f"its middle block alone changes {', '.join(f'{m / e:.1f}x' for m, e in zip(mid, enc))} as much as the "
            f"skips' mean per third.")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), sharey=True)
    styles = {"encoder": ("tab:blue", "-"), "middle": ("tab:blue", ":"), "decoder": ("tab:red", "-"),
              "output": ("tab:red", ":")}
    labels = {"encoder": "encoder (mean over skips)", "middle": "middle block", "decoder": "decoder (mean over blocks)",
              "output": "final output"}
    for ax, (name, series) in zip(list(axes), results.items()):
        for s in SERIES:
            color, ls = styles[s]
            ax.plot(range(1, len(series[s]) + 1), series[s], color=color, linestyle=ls, label=labels[s])
        ax.set_yscale("log")
        ax.set_title(f"{name} model (euler, {STEPS} steps, CFG {CFG:g})")
        ax.set_xlabel("step i")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("relative change ||f_i - f_(i-1)|| / ||f_(i-1)||")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4, help="images per model (one class each)")
    ap.add_argument("--out", default=str(tm.REPO / "docs"))
    args = ap.parse_args()
    tm.boot_comfy()
    import torch
    import comfy.utils
    from testmodel import fashion
    torch.set_num_threads(1)
    comfy.utils.set_progress_bar_enabled(False)
    tm.load_pack(tempfile.mkdtemp())          # puts the engine on the path, as ComfyUI loads it
    digits, dtok = tm.load_test_model()
    fmodel, ftok = fashion.load_fashion_model()
    classes = [(3 * i + 1) % 10 for i in range(args.samples)]
    with torch.no_grad():
        results = {"digits": measure(digits, lambda m: tm.sample_digits(m, dtok, classes, seed=0, steps=STEPS, cfg=CFG)),
                   "Fashion-MNIST": measure(fmodel, lambda m: fashion.sample(m, ftok, classes, seed=0, steps=STEPS, cfg=CFG))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "feature_dynamics.png")
    lines = ["# Feature dynamics: encoder vs decoder change per step (the paper's Fig. 3 analogue)", "",
             f"Command: `OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/feature_dynamics.py --samples {args.samples}` "
             f"(euler, {STEPS} steps, CFG {CFG:g}, {args.samples} samples per model, seed 0).", "",
             "Relative change of a feature tensor between adjacent steps, ||f_i - f_(i-1)|| / ||f_(i-1)||; encoder = "
             "mean over the skip tensors (input-block outputs), decoder = mean over the output blocks. Mean over "
             "the steps in each third of the schedule (steps 1-49):", "",
             "| model | series | first third | middle third | last third |", "|---|---|---|---|---|"]
    for name, series in results.items():
        for s in SERIES:
            lines.append(f"| {name} | {s} | " + " | ".join(f"{v:.4f}" for v in thirds(series[s])) + " |")
    lines += ["", "![feature dynamics](feature_dynamics.png)", ""]
    lines += [verdict(name, series) + "\n" for name, series in results.items()]
    (out / "feature_dynamics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
