"""FasterDiffusion on a DiT: the Flux-shaped Fashion-MNIST model (testmodel/fashion_flux.py), three questions.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/dit_benchmark.py                      # ~40 min, one CPU thread
    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/dit_benchmark.py --parts dynamics     # (a) only, ~1 min
    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/dit_benchmark.py --samples 20 --out /tmp/x   # a smoke run
    .testhost/venv/bin/python tools/dit_benchmark.py --replot      # redraw the cost plot from the saved table

(a) feature dynamics (the paper's Fig. 11): forward hooks on this tool's own copy of the model read the output hidden
    state of every block (double blocks: text and image tokens, single blocks: the joint tokens) and of the final
    layer; per block, the relative change ||f_i - f_(i-1)|| / ||f_(i-1)|| between consecutive steps of a full run.
    Writes docs/feature_dynamics_flux.{md,png}.
(b) the split point: ``encoder_blocks`` 1..depth-1 at uniform:3 and at the paper's keys (cut at the step count);
    PSNR to the full run, FD and class accuracy against measured time and FLOPs.  The best split is the one whose
    runs gain most PSNR over plain fewer steps at equal measured time (mean over the two strategies).
(c) at the best split: FasterDiffusion (reuse and forecast, several strategies) against ComfyUI's own EasyCache
    (``comfy_extras.nodes_easycache.EasyCacheNode``, several thresholds) and plain fewer steps, at equal measured
    time and at equal FLOPs (each row's quality next to the fewer-step curve's, interpolated at the row's cost).
(b) and (c) write docs/quality/fashion_flux.md, fashion_flux_split.png and fashion_flux_vs_cost.png.

Every run samples through ComfyUI's own sampler path (``comfy.sample.sample_custom`` with a KSAMPLER; the
FasterDiffusion runs with the pack's ``KSamplerWithFasterDiffusion``), euler, ``--scheduler`` sigmas, CFG 3, the same
seeds for every configuration.  Quality: FD-fashion (Frechet distance of the committed classifier's features to the
real test set), that classifier's accuracy, PSNR to the full run's images.  Cost: FLOPs counted by torch's
FlopCounterMode over a whole run of one image, and the median wall time of whole runs of one image (CFG, parallel
decoders, one thread), every configuration timed in turn in each round so that load from other processes falls on
all of them alike; both relative to the full run.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import statistics
import sys
import time
from importlib import import_module
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("dit_benchmark")
import testmodel as tm  # noqa: E402
from quality_benchmark import label_points, point_label  # noqa: E402  (tools/, next to this script)

CFG = 3.0
SAMPLER = "euler"
STRATEGIES_SPLIT = ("uniform:3", "paper")
STRATEGIES = ("paper", "uniform:2", "uniform:3", "uniform:4", "uniform:5")
EASYCACHE = (0.05, 0.1, 0.2, 0.3)


# --------------------------------------------------------------------------------------------------
# (a) feature dynamics
# --------------------------------------------------------------------------------------------------

def relative_change(prev, cur) -> float:
    """||cur - prev|| / ||prev|| (Frobenius norms)."""
    return float((cur - prev).norm() / prev.norm().clamp_min(1e-12))


class BlockDynamics:
    """Forward hooks on every block and the final layer of one Flux; per step (a new timestep starts one), each
    output's relative change from the previous step's."""

    def __init__(self, dm):
        import torch
        self.torch = torch
        self.names = [f"double {i}" for i in range(len(dm.double_blocks))]
        self.names += [f"single {i}" for i in range(len(dm.single_blocks))] + ["final layer"]
        modules = list(dm.double_blocks) + list(dm.single_blocks) + [dm.final_layer]
        self.hooks = [m.register_forward_hook(self.keep(name)) for name, m in zip(self.names, modules)]
        self.hooks.append(dm.register_forward_pre_hook(self.begin, with_kwargs=True))
        self.timestep, self.current, self.prev, self.changes = None, {}, None, []

    def keep(self, name):
        def hook(module, args, output):
            # a double block returns (img, txt); the next block adds into its input in place: copy now
            out = self.torch.cat((output[1], output[0]), 1) if isinstance(output, tuple) else output
            self.current.setdefault(name, []).append(out.detach().float().clone())
        return hook

    def begin(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(timestep.flatten()[0])
        if t != self.timestep:           # cond and uncond of one step share its timestep
            self.finish_step()
            self.timestep = t

    def finish_step(self):
        if self.current:
            feats = {k: self.torch.cat(v) for k, v in self.current.items()}
            if self.prev is not None:
                self.changes.append({k: relative_change(self.prev[k], feats[k]) for k in self.names})
            self.prev, self.current = feats, {}

    def close(self):
        self.finish_step()
        for h in self.hooks:
            h.remove()
        return {k: [c[k] for c in self.changes] for k in self.names}


def thirds(values):
    n = len(values)
    cuts = [0, round(n / 3), round(2 * n / 3), n]
    return [sum(values[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:])]


def dynamics_finding(series: dict, depth: int) -> str:
    """Do the first blocks change gently?  The first third of the blocks against the last third, per third of the
    run, and where the change is smallest."""
    blocks = list(series)[:depth]
    k = max(1, depth // 3)
    first = [sum(series[b][i] for b in blocks[:k]) / k for i in range(len(series[blocks[0]]))]
    last = [sum(series[b][i] for b in blocks[-k:]) / k for i in range(len(series[blocks[0]]))]
    ratios = [lt / ft for lt, ft in zip(thirds(last), thirds(first))]
    means = {b: sum(v) / len(v) for b, v in series.items() if b in blocks}
    calm = min(means, key=means.get)
    verdict = ("yes: the first blocks change less than the last ones in every third of the run"
               if all(r > 1 for r in ratios) else
               "no: the first blocks change as much as the last ones or more in the "
               + " and ".join(t for t, r in zip(("first", "middle", "last"), ratios) if r <= 1) + " third")
    return (f"Do the first blocks change gently? **{verdict}** (last {k} blocks / first {k} blocks, mean change per "
            f"third of the run: {', '.join(f'{r:.2f}x' for r in ratios)}). The calmest block over the whole run is "
            f"{calm} ({means[calm]:.4f}); the most changing is {max(means, key=means.get)} "
            f"({max(means.values()):.4f}).")


def run_dynamics(kit, args, out_docs: Path):
    import torch
    from testmodel import fashion_flux as ff
    model, tokens, vectors = ff.load_fashion_flux()          # this tool's own copy: the hooks go on it
    dm = model.model.diffusion_model
    dyn = BlockDynamics(dm)
    classes = [c % 10 for c in range(args.dynamics_samples)]
    try:
        with torch.no_grad():
            kit.sample(model, None, args.steps, classes, 0)
    finally:
        series = dyn.close()
    depth = len(dm.double_blocks) + len(dm.single_blocks)
    plot_dynamics(series, out_docs / "feature_dynamics_flux.png", args)
    lines = ["# Feature dynamics of a DiT: the Flux-shaped Fashion-MNIST model (the paper's Fig. 11 analogue)", "",
             f"Command: `{command()}` ({SAMPLER}, {args.scheduler} scheduler, {args.steps} steps, CFG {CFG:g}, "
             f"{args.dynamics_samples} samples, seed 0; model: testmodel/fashion_flux.safetensors, 2 double + 8 single "
             "blocks).", "",
             "Relative change of each block's output hidden state between consecutive steps, "
             "||f_i - f_(i-1)|| / ||f_(i-1)|| over the whole batch (cond and uncond rows; double blocks: text and image "
             "tokens, single blocks: the joint tokens). Mean over all steps and over each third of the run:", "",
             "| block | all steps | first third | middle third | last third |", "|---|---|---|---|---|"]
    for name, values in series.items():
        lines.append(f"| {name} | {sum(values) / len(values):.4f} | " + " | ".join(f"{v:.4f}" for v in thirds(values)) + " |")
    lines += ["", "![feature dynamics](feature_dynamics_flux.png)", "", dynamics_finding(series, depth), ""]
    (out_docs / "feature_dynamics_flux.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return series


def plot_dynamics(series, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    cmap = plt.get_cmap("viridis")
    names = list(series)
    for i, name in enumerate(names):
        values = series[name]
        style = dict(color="tab:red", linestyle="--") if name == "final layer" else dict(color=cmap(i / (len(names) - 1)))
        ax.plot(range(1, len(values) + 1), values, label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("step i")
    ax.set_ylabel("relative change ||f_i - f_(i-1)|| / ||f_(i-1)||")
    ax.set_title(f"per block ({SAMPLER}, {args.scheduler}, {args.steps} steps, CFG {CFG:g})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    for j, label in enumerate(("first third", "middle third", "last third")):
        bx.plot(range(len(names)), [thirds(series[n])[j] for n in names], marker="o", label=label)
    bx.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    bx.set_yscale("log")
    bx.set_ylabel("mean relative change")
    bx.set_title("mean per block and third of the run")
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------
# (b), (c): sampling, scoring, cost
# --------------------------------------------------------------------------------------------------

class Kit:
    """The model, its conditioning and scoring; ``sample`` runs ComfyUI's sampler path."""

    def __init__(self, args):
        import comfy.samplers
        from testmodel import fashion as fm
        from testmodel import fashion_flux as ff
        self.fm, self.ff, self.args = fm, ff, args
        self.model, self.tokens, self.vectors = ff.load_fashion_flux()
        self.sampling = self.model.get_model_object("model_sampling")
        self.plain = comfy.samplers.sampler_object(SAMPLER)
        real, _ = fm.fashion_dataset("test")
        self.real = fm.features_and_logits(real)[0].numpy()

    def sample(self, model, sampler, steps, labels, seed):
        """ComfyUI latents of one run: ``sampler`` None = plain euler."""
        import torch
        import comfy.sample
        import comfy.samplers
        pos, neg = self.ff.conditioning(self.tokens, self.vectors, labels)
        latent = torch.zeros(len(labels), self.ff.LATENT_CHANNELS, self.ff.LATENT_SIZE, self.ff.LATENT_SIZE)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(self.sampling, self.args.scheduler, steps)
        return comfy.sample.sample_custom(model, noise, CFG, sampler or self.plain, sigmas, pos, neg, latent,
                                          seed=seed, disable_pbar=True).float().cpu()

    def score(self, images, reference, classes):
        import numpy as np
        mse = float(((images - reference) ** 2).mean())
        return dict(fd=self.fm.frechet_distance(self.fm.features_and_logits(images)[0].numpy(), self.real),
                    acc=float((self.fm.classify(images) == np.array(classes)).mean()),
                    psnr=math.inf if mse == 0 else 10 * math.log10(1 / mse))


class Config:
    """One configuration: a name, a family (plot group) and ``run(labels, seed, cap)`` -> latents; FasterDiffusion
    ones keep their FasterDiffusionConfig (its reports say what the run did)."""

    def __init__(self, name, family, run, fd_config=None, split=None):
        self.name, self.family, self.run, self.fd_config, self.split = name, family, run, fd_config, split


def configs_factory(kit, cu, cs):
    def plain(steps, model=None):
        return lambda labels, seed, cap=0: kit.sample(model or kit.model, None, steps, labels, seed)

    def fd(name, family, strategy, n, propagation="reuse"):
        config_box = {}

        def run(labels, seed, cap=0):
            settings = cu.Settings.of(strategy, True, cap, propagation, encoder_blocks=n)
            config = cu.FasterDiffusionConfig(settings)
            config_box["config"] = config
            return kit.sample(kit.model, cs.KSamplerWithFasterDiffusion(SAMPLER, config), kit.args.steps, labels, seed)
        c = Config(name, family, run, split=n)
        c.fd_config = config_box
        return c
    return plain, fd


def flops(run):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        run([3], 77)
    return fc.get_total_flops()


def measured_seconds(configs, repeats: int) -> dict:
    """Median wall time of whole runs of one image per configuration; each round times every configuration in turn
    (after one warm-up round), so that other processes' load falls on all alike."""
    times = {c.name: [] for c in configs}
    for r in range(repeats + 1):
        for c in configs:
            t0 = time.perf_counter()
            c.run([3], 77, 32)
            if r:
                times[c.name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def check_served(c):
    """A FasterDiffusion run must really have run split (not bypassed, some decoder-only steps)."""
    if c.fd_config is None:
        return ""
    report = c.fd_config["config"].reports[-1]
    if report.get("bypassed") or (len(report["keys"]) < report["steps"] and not report.get("cached_calls")):
        raise RuntimeError(f"{c.name}: FasterDiffusion did not serve the Flux model: {report}")
    return f"encoder {report.get('encoder_calls')}, cached {report.get('cached_calls')}"


def interpolate(points, x):
    """Linear interpolation of the (x, y) curve ``points`` at x (clamped at its ends)."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def versus_fewer_steps(rows, baseline_rows):
    """Each row's quality minus the fewer-step curve's at the row's measured time and at its FLOPs."""
    for r in rows:
        for cost in ("measured", "flops"):
            for q in ("psnr", "fd"):
                curve = [(b[cost], b[q]) for b in baseline_rows if not math.isinf(b[q])]
                r[f"d{q}_{cost}"] = (r[q] - interpolate(curve, r[cost])) if not math.isinf(r[q]) else math.inf


def evaluate(kit, configs, classes, reference, base_flops, repeats, full=None, also_timed=()):
    """Score every configuration (the first one's images are the reference when ``reference`` is None), then time
    them all; ``full``: the full run, timed in the same rounds and not scored again, for ``measured`` (each row's
    time relative to the full run's); ``also_timed``: more configurations timed in the same rounds (the fewer-step
    curve, so that every time a table compares was measured under the same load).  Returns (rows, reference,
    {name: median seconds})."""
    rows = []
    for c in configs:
        t0 = time.perf_counter()
        images = kit.ff.decode(c.run(classes, 1))
        served = check_served(c)
        if reference is None:
            reference = images
        rows.append(dict(name=c.name, family=c.family, split=c.split, served=served,
                         flops=flops(c.run) / base_flops, seconds=time.perf_counter() - t0,
                         **kit.score(images, reference, classes)))
        r = rows[-1]
        print(f"{c.name:34s} FLOPs {r['flops']:.3f}  FD {r['fd']:6.2f}  acc {r['acc']:.0%}  PSNR {r['psnr']:6.2f}  "
              f"{r['seconds']:5.1f}s  {served}", flush=True)
    seconds = measured_seconds(configs + ([full] if full else []) + list(also_timed), repeats)
    for r in rows:
        r["measured_s"] = seconds[r["name"]]
        r["measured"] = r["measured_s"] / seconds[(full or configs[0]).name]
    return rows, reference, seconds


def host_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return str(tm.comfy_dir())


def command():
    return "OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/dit_benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def fmt_psnr(v):
    return "∞" if math.isinf(v) else f"{v:.2f}"


def table(rows, with_delta=True, fd_delta=True):
    head = "| configuration | FLOPs | time measured | FD-fashion ↓ | accuracy | PSNR to full run |"
    rule = "|---|---|---|---|---|---|"
    if with_delta:
        head += (" ΔPSNR / ΔFD" if fd_delta else " ΔPSNR") + " vs fewer steps at equal time | at equal FLOPs |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['name']} | {r['flops']:.3f} | {r['measured']:.3f} | {r['fd']:.2f} | {r['acc']:.1%} | "
                f"{fmt_psnr(r['psnr'])} |")
        if with_delta:
            line += "".join(f" {r[f'dpsnr_{c}']:+.2f} dB" + (f" / {r[f'dfd_{c}']:+.2f} |" if fd_delta else " |")
                            for c in ("measured", "flops"))
        lines.append(line)
    return lines


STYLE = {"baseline": ("k", "o", "fewer steps"), "FD": ("tab:orange", "s", "FasterDiffusion reuse"),
         "FD forecast": ("tab:purple", "P", "FasterDiffusion forecast"), "EasyCache": ("tab:blue", "D", "EasyCache")}


def plot_cost(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 10), dpi=110)
    for row_axes, (q, qlabel) in zip(axes, (("fd", "FD-fashion (lower is better)"), ("psnr", "PSNR to the full run, dB"))):
        for ax, (x, xlabel) in zip(row_axes, (("measured", "time relative to the full run (measured, 1 CPU thread)"),
                                               ("flops", "FLOPs relative to the full run"))):
            for fam, (color, marker, legend) in STYLE.items():
                pts = sorted((r for r in rows if r["family"] == fam and not math.isinf(r[q])), key=lambda r: r[x])
                ax.scatter([r[x] for r in pts], [r[q] for r in pts], c=color, marker=marker, label=legend)
                if fam == "baseline":
                    ax.plot([r[x] for r in pts], [r[q] for r in pts], c=color, lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(qlabel)
            if q == "fd":
                ax.set_yscale("log")         # EasyCache's failures sit an order of magnitude above the rest
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    for row_axes, q in zip(axes, ("fd", "psnr")):
        for ax, x in zip(row_axes, ("measured", "flops")):
            label_points(ax, [(r[x], r[q], point_label(r["name"]), STYLE[r["family"]][0])
                              for r in rows if not math.isinf(r[q])])
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def plot_split(rows, path, depth):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for s, color in zip(STRATEGIES_SPLIT, ("tab:orange", "tab:green")):
        pts = sorted((r for r in rows if r["strategy"] == s), key=lambda r: r["split"])
        for ax, q in zip(axes, ("psnr", "fd", "measured")):
            ax.plot([r["split"] for r in pts], [r[q] for r in pts], marker="o", color=color, label=s)
        axes[2].plot([r["split"] for r in pts], [r["flops"] for r in pts], marker="x", linestyle="--", color=color,
                     label=f"{s} FLOPs")
    axes[2].legend(fontsize=8)
    for ax, label in zip(axes, ("PSNR to the full run, dB", "FD-fashion (lower is better)",
                                "cost relative to the full run (time: o, FLOPs: x)")):
        ax.set_xlabel(f"encoder_blocks (of {depth})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def family(name: str) -> str:
    """The plot group of a row of the tables, from its name."""
    for prefix, fam in (("baseline", "baseline"), ("EasyCache", "EasyCache"), ("FD forecast", "FD forecast")):
        if name.startswith(prefix):
            return fam
    return "FD"


def read_cost_rows(md: Path) -> list:
    """The fewer-step and section (c) rows of a fashion_flux.md this tool wrote (for --replot)."""
    rows, section = [], ""
    for line in md.read_text().splitlines():
        section = line if line.startswith("## ") else section
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not section.startswith("## (c)") or len(cells) < 6 or not cells[1].replace(".", "", 1).isdigit():
            continue
        name, flops_, measured, fd, acc, psnr = cells[:6]
        rows.append(dict(name=name, family=family(name), flops=float(flops_), measured=float(measured), fd=float(fd),
                         acc=float(acc.rstrip("%")) / 100, psnr=math.inf if psnr == "∞" else float(psnr)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="dynamics,split,quality", help="which of dynamics, split, quality")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--split-samples", type=int, default=100, help="samples per run of the split sweep (b)")
    ap.add_argument("--dynamics-samples", type=int, default=20)
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--split", type=int, default=0, help="the split for (c); 0 = the best of (b)")
    ap.add_argument("--out", default=str(tm.REPO / "docs"))
    ap.add_argument("--replot", action="store_true", help="redraw fashion_flux_vs_cost.png from the saved table")
    args = ap.parse_args()
    if args.replot:
        quality = Path(args.out) / "quality"
        split = re.search(r"## \(c\) Quality vs cost at split (\d+)", (quality / "fashion_flux.md").read_text()).group(1)
        plot_cost(read_cost_rows(quality / "fashion_flux.md"), quality / "fashion_flux_vs_cost.png",
                  f"Flux-shaped Fashion-MNIST model, {SAMPLER} {args.steps} steps, CFG {CFG:g}: FasterDiffusion "
                  f"(split {split}) vs EasyCache vs fewer steps")
        return
    parts = {p.strip() for p in args.parts.split(",")}
    _, cu = tm.tool_session()
    package = cu.__name__.rsplit(".", 3)[0]
    cs = import_module(package + ".patches.comfy.sampler")
    from comfy_extras.nodes_easycache import EasyCacheNode
    out_docs = Path(args.out)
    (out_docs / "quality").mkdir(parents=True, exist_ok=True)
    kit = Kit(args)
    t_start = time.time()
    if "dynamics" in parts:
        run_dynamics(kit, args, out_docs)
    if not parts & {"split", "quality"}:
        return
    dm = kit.model.model.diffusion_model
    depth = len(dm.double_blocks) + len(dm.single_blocks)
    plain, fd = configs_factory(kit, cu, cs)
    steps = args.steps
    classes = [c % 10 for c in range(args.samples)]
    fewer = sorted({max(2, round(steps * f)) for f in (1, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2)}, reverse=True)
    baselines = [Config(f"baseline {n} steps", "baseline", plain(n)) for n in fewer]
    base_flops = flops(baselines[0].run)
    base_rows, reference, _ = evaluate(kit, baselines, classes, None, base_flops, args.timing_repeats)
    spread = [kit.fm.frechet_distance(kit.fm.features_and_logits(kit.ff.decode(baselines[0].run(classes, s)))[0].numpy(),
                                      kit.real) for s in (2, 3)] + [base_rows[0]["fd"]]
    md = [f"# FasterDiffusion on a DiT: the Flux-shaped Fashion-MNIST model ({args.samples} samples, {SAMPLER}, "
          f"{args.scheduler} scheduler, CFG {CFG:g}, {steps}-step reference)", "",
          f"Command: `{command()}`; machine: CPU, one thread (2 cores shared with other jobs; times are medians of "
          f"{args.timing_repeats} rounds, every configuration timed in each round). Model: testmodel/fashion_flux.safetensors "
          f"(ComfyUI's Flux, 2 double + 8 single blocks, hidden 128). Host: ComfyUI {host_version()}.", "",
          f"FD-fashion of the {steps}-step run over three seed sets: {', '.join(f'{v:.2f}' for v in spread)} "
          f"(spread {max(spread) - min(spread):.2f}). Costs are relative to the {steps}-step run "
          f"({base_rows[0]['measured_s'] * 1000:.0f} ms per image measured). ΔPSNR / ΔFD: the row's quality minus plain "
          "fewer steps' interpolated at the row's measured time, and at its FLOPs (ΔPSNR > 0 and ΔFD < 0 beat fewer "
          "steps).", ""]

    split = args.split
    if "split" in parts:
        n_split = min(args.split_samples, args.samples)
        split_configs = [fd(f"FD {s} split {n}", "FD", s, n) for n in range(1, depth) for s in STRATEGIES_SPLIT]
        split_all, _, seconds = evaluate(kit, baselines[:1] + split_configs, classes[:n_split], None, base_flops,
                                         args.timing_repeats, also_timed=baselines[1:])
        split_rows = split_all[1:]
        for r in split_rows:
            r["strategy"] = r["name"].split()[1]
        curve = [dict(r, measured=seconds[r["name"]] / seconds[baselines[0].name]) for r in base_rows]
        versus_fewer_steps(split_rows, curve)      # the fewer-step curve as timed in these rounds
        gain = {n: statistics.mean(r["dpsnr_measured"] for r in split_rows if r["split"] == n) for n in range(1, depth)}
        gain_flops = {n: statistics.mean(r["dpsnr_flops"] for r in split_rows if r["split"] == n) for n in range(1, depth)}
        best = max(gain, key=gain.get)
        split = split or best
        plot_split(split_rows, out_docs / "quality" / "fashion_flux_split.png", depth)
        md += ["## (b) The split point", "",
               f"`encoder_blocks` 1..{depth - 1} (blocks counted over the 2 double, then the 8 single blocks) at "
               f"{' and '.join(STRATEGIES_SPLIT)} ({steps} steps, the first {n_split} samples; FD over {n_split} "
               f"samples is not comparable with the 200-sample FDs below, only within this table). Best split by the "
               f"mean ΔPSNR at equal measured time: **{best}** of {depth} (fraction {best / depth:.2f}); by FLOPs: "
               f"{max(gain_flops, key=gain_flops.get)}. The paper's DiT-XL/2 split 18/28 = 0.64 gives "
               f"{min(max(1, round(18 / 28 * depth)), depth - 1)} here.", ""]
        md += table(split_rows, fd_delta=False) + ["", "![split](fashion_flux_split.png)", ""]
        md += ["Mean ΔPSNR over the two strategies per split, at equal measured time: "
               + ", ".join(f"{n}: {g:+.2f} dB" for n, g in gain.items()) + "; at equal FLOPs: "
               + ", ".join(f"{n}: {g:+.2f} dB" for n, g in gain_flops.items()), ""]
    if "quality" in parts:
        split = split or min(max(1, round(18 / 28 * depth)), depth - 1)
        qconfigs = []
        for s in STRATEGIES:
            qconfigs.append(fd(f"FD {s}", "FD", s, split))
            qconfigs.append(fd(f"FD forecast {s}", "FD forecast", s, split, "forecast"))
        for th in EASYCACHE:
            (ec,) = EasyCacheNode.execute(kit.model, th, 0.15, 0.95, False).result
            qconfigs.append(Config(f"EasyCache {th}", "EasyCache", plain(steps, ec)))
        qrows, _, seconds = evaluate(kit, qconfigs, classes, reference, base_flops, args.timing_repeats,
                                     full=baselines[0], also_timed=baselines[1:])
        for r in base_rows:           # the fewer-step curve as timed in these rounds
            r["measured_s"] = seconds[r["name"]]
            r["measured"] = r["measured_s"] / seconds[baselines[0].name]
        versus_fewer_steps(qrows, base_rows)
        plot_cost(base_rows + qrows, out_docs / "quality" / "fashion_flux_vs_cost.png",
                  f"Flux-shaped Fashion-MNIST model, {SAMPLER} {steps} steps, CFG {CFG:g}: FasterDiffusion "
                  f"(split {split}) vs EasyCache vs fewer steps")
        md += [f"## (c) Quality vs cost at split {split}", "",
               "Fewer steps (the curve the others are compared with):", ""] + table(base_rows, with_delta=False)
        md += ["", f"FasterDiffusion at `encoder_blocks` {split} (reuse = the paper's propagation, forecast = "
               "extrapolated features) and ComfyUI's EasyCache (start 0.15, end 0.95):", ""] + table(qrows)
        md += ["", "![cost](fashion_flux_vs_cost.png)", ""]
        wins = {c: [r["name"] for r in qrows if r[f"dpsnr_{c}"] > 0 and r[f"dfd_{c}"] < 0] for c in ("measured", "flops")}
        md += [f"Rows that beat fewer steps on both PSNR and FD at equal measured time: {', '.join(wins['measured']) or 'none'}; "
               f"at equal FLOPs: {', '.join(wins['flops']) or 'none'}.", ""]
    md += [f"Total benchmark time: {(time.time() - t_start) / 60:.1f} min.", ""]
    (out_docs / "quality" / "fashion_flux.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
