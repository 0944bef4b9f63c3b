"""Quality vs cost: does FasterDiffusion beat simply running fewer steps, at equal FLOPs and at equal GPU time?

    bash tools/run.sh quality --model fashion --device cuda     # Fashion-MNIST model, ~3 min on an H200
    bash tools/run.sh quality --model digits                    # digits model, ~30 min on one CPU thread
    bash tools/run.sh quality --model fashion --replot          # redraw the plot from the saved table (seconds)
    bash tools/run.sh quality --model digits --sampler dpmpp_2m --steps 20    # another sampler and step count

Every configuration samples the same seeds (``--samples`` images, equal per class) through ComfyUI and is scored
  * FD: Frechet distance between classifier features of generated and real held-out images (an FID analogue;
    digits: the hidden layer of an MLP trained on the other real digits; fashion: the 128-d layer of the CNN in
    testmodel/fashion_classifier.safetensors); lower is better; its run-to-run spread is in the table's header;
  * accuracy of a classifier (digits: an SVM; fashion: that CNN's logits) on the generated images;
  * PSNR to the 50-step full run on the same seeds (fidelity);
  * cost, three ways, relative to the 50-step run:
    (a) UNet FLOPs counted by torch's FlopCounterMode over a whole sampling run;
    (b) GPU UNet time composed from the H100 SD1.5 eager batch-cost curve (shared/docs/gpu.md; the engine's
        ``predicted_gpu_fraction``): what the plan would cost on an SD1.5-class model with parallel decoders;
    (c) measured: median wall time of whole sampling runs of one image (CFG) on ``--device``
        (CUDA-synchronised), this model, parallel decoders on.
Every FasterDiffusion plan runs twice: with ``reuse`` (the paper's propagation: rows "FD ...") and with
``forecast`` (features extrapolated from the last key steps: rows "FD forecast ..."); the reference and the plain
fewer-step baselines use the same ``--sampler``.
Writes ``<name>.md`` (table) and ``<name>_vs_cost.png`` (plots) into ``--out`` (name: ``quality`` for digits,
``fashion`` for the Fashion-MNIST model, with ``_<sampler>_<steps>`` appended for other than euler at 50 steps).
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("quality")         # says which interpreter to use when this one has no torch
import testmodel as tm  # noqa: E402

DEFAULT_STEPS = 50  # the default step count; --steps sets the run's
# the paper's Non-uniform II shape (Table 5, sparse early / dense late): t {50,30,25,20,15,14,5,4,3}
LATE_DENSE = "0,20,25,30,35,36,45,46,47"
TABLE_NAME = {"digits": "quality", "fashion": "fashion"}


def feature_space():
    """(feature function on [N,16,16] images, real held-out features): an MLP trained on 2/3 of the digits."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    d = load_digits()
    held = np.arange(len(d.data)) % 3 == 0
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0).fit(d.data[~held], d.target[~held])

    def features(x8):
        return np.maximum(0, x8 @ mlp.coefs_[0] + mlp.intercepts_[0])
    return features, features(d.data[held])


def to8(images):
    import torch.nn.functional as F
    small = F.avg_pool2d(images.detach().unsqueeze(1).float(), 2).squeeze(1) * 16.0
    return small.reshape(len(images), -1).numpy()


def frechet(a, b):
    import numpy as np
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def laplacian_energy(images):
    """Mean squared Laplacian of images [N, H, W]: the pixel noise FD hardly sees."""
    import torch
    import torch.nn.functional as F
    laplace = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    return float(F.conv2d(images.float().unsqueeze(1), laplace).pow(2).mean())


def speckle(kit, images):
    """``images``' Laplacian energy over the real images' (1 = as smooth as real images)."""
    return laplacian_energy(images) / kit.real_hf


class Digits:
    """The digits test model: what the benchmark needs of a model."""
    title, fd_name = "Digits test model", "FD-digits"

    def __init__(self, device, dtype=None):
        self.model, self.tokens = tm.load_test_model()
        self._features, self.real = feature_space()
        self.real_hf = laplacian_energy(tm.digits_dataset()[0])

    def conditioning(self, classes):
        return tm.digit_conditioning(self.tokens, classes)

    latent_size, decode = tm.LATENT_SIZE, staticmethod(tm.decode)

    def features(self, images):
        return self._features(to8(images))

    def classify(self, images):
        return tm.classify(images)


class Fashion:
    title, fd_name = "Fashion-MNIST test model", "FD-fashion"

    def __init__(self, device, dtype=None):
        from testmodel import fashion as fm
        self.fm = fm
        self.model, self.tokens = fm.load_fashion_model(dtype=dtype)
        real, _ = fm.fashion_dataset("test")
        self.real = fm.features_and_logits(real)[0].numpy()
        self.real_hf = laplacian_energy(real)

    def conditioning(self, classes):
        return self.fm.conditioning(self.tokens, classes)

    latent_size = 16

    def decode(self, latents):
        return self.fm.decode(latents)

    def features(self, images):
        return self.fm.features_and_logits(images)[0].numpy()

    def classify(self, images):
        return self.fm.classify(images)


def sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(TABLE_NAME), default="digits")
    ap.add_argument("--sampler", default="euler", help="euler, euler_ancestral, ddim, dpmpp_2m, lms")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="the full run's steps (the reference)")
    ap.add_argument("--forecast-always", action="store_true", help="forecast even with samplers where the pack "
                    "reuses (ancestral): measures what that policy avoids")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the measured time column is this device's")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="the Fashion model's inference dtype")
    ap.add_argument("--samples", type=int, default=600)   # FD-digits seed spread ~2 at 600, ~12 at 200
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--calibration-samples", type=int, default=10, help="samples of the calibration pass (seeds 1000..)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching configurations (smoke tests)")
    ap.add_argument("--out", default=str(tm.REPO / "docs" / "quality"))
    ap.add_argument("--replot", action="store_true", help="redraw the plot from the saved table")
    args = ap.parse_args()
    out, name = Path(args.out), table_name(args.model, args.sampler, args.steps)
    if args.replot:
        plot(read_rows(out / f"{name}.md"), out / f"{name}_vs_cost.png", title=f"{args.model} test model")
        print(f"wrote {out / f'{name}_vs_cost.png'} from {out / f'{name}.md'}")
        return
    tm.boot_comfy(cpu=args.device == "cpu")
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    from comfy_extras.nodes_easycache import EasyCacheNode
    from importlib import import_module
    if args.device == "cpu":
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    comfy.utils.set_progress_bar_enabled(False)
    Apply, cu = tm.load_pack(tempfile.mkdtemp())
    package = cu.__name__.rsplit(".", 3)[0]
    calibration = import_module(package + ".patches.comfy.calibrate")
    cs = import_module(package + ".patches.comfy.sampler")
    if args.forecast_always:
        cu.forecast_off_reason = lambda name, steps: None
    engine = import_module(package + ".fasterdiffusion")
    kit = (Digits if args.model == "digits" else Fashion)(args.device, torch.float16 if args.dtype == "fp16" else None)
    model = kit.model
    classes = [c % 10 for c in range(args.samples)]
    sampling = model.get_model_object("model_sampling")

    def sample(m, sampler, steps, labels, seed, batch_cap=0):
        pos, neg = kit.conditioning(labels)
        latent = torch.zeros(len(labels), 4, kit.latent_size, kit.latent_size)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)   # KSampler's, for these samplers
        return comfy.sample.sample_custom(m, noise, 3.0, sampler, sigmas, pos, neg, latent, seed=seed,
                                          disable_pbar=True).float().cpu()

    STEPS, SAMPLER = args.steps, args.sampler
    main_grid = (SAMPLER, STEPS) == ("euler", 50)      # the first tables' extra rows: drift, late-dense, injection
    forecast = import_module(package + ".fasterdiffusion.forecast")

    def plain(steps, m=model):
        return lambda labels, seed, cap=0: sample(m, comfy.samplers.sampler_object(SAMPLER), steps, labels, seed)

    def fd(strategy, alpha=0.0, steps=STEPS, propagation="reuse"):
        def run(labels, seed, cap=0):
            settings = cu.Settings.of(strategy, True, cap, propagation, injection_alpha=alpha, injection_threshold=500.0)
            sampler = cs.KSamplerWithFasterDiffusion(SAMPLER, cu.FasterDiffusionConfig(settings))
            return sample(model, sampler, steps, labels, seed)
        return run

    # calibrate on other seeds than the scored ones
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
    # the Calibrate node's criteria from one recording pass: encoder drift, the decoder-output error, and the
    # output error of forecast propagation
    rec_model, recorder = calibration.recording_model(model, sigmas.tolist(), stale_outputs=True)
    sample(rec_model, comfy.samplers.sampler_object(SAMPLER), STEPS, [c % 10 for c in range(args.calibration_samples)], 1000)
    criteria = {"output": recorder.output_error(), "forecast": recorder.forecast_output_error()}
    if main_grid:
        criteria["drift"] = recorder.drift()
    budgets = (5, 9, 13) if STEPS >= 40 else tuple(sorted({max(2, round(STEPS * f)) for f in (0.2, 0.3, 0.4)}))
    calibrated = {(c, k): ",".join(map(str, engine.choose_keys(m, STEPS, k))) for c, m in criteria.items() for k in budgets}

    fewer = sorted({max(2, round(STEPS * f)) for f in (1, 0.6, 0.5, 0.4, 0.3, 0.2, 0.16)}, reverse=True)
    configs = {f"baseline {n} steps": ("baseline", plain(n), None) for n in fewer}
    uniform = [f"uniform:{k}" for k in range(2, 9)]
    for s in ["paper"] + uniform + ([LATE_DENSE] if main_grid else []):
        label = "late-dense (paper Non-uniform II)" if s == LATE_DENSE else s
        configs[f"FD {label}"] = ("FD", fd(s), (s, STEPS))
        if s != LATE_DENSE:
            configs[f"FD forecast {label}"] = ("FD forecast", fd(s, propagation="forecast"), (s, STEPS))
    for s in ("uniform:3", "uniform:5"):
        configs[f"FD forecast o2 {s}"] = ("FD forecast", fd(s, propagation=forecast.Forecast(2)), (s, STEPS))
    shorter = ((25, "uniform:2"), (25, "uniform:3"), (20, "uniform:2"), (15, "uniform:2")) if STEPS >= 40 else \
        ((round(STEPS * 0.75), "uniform:2"), (round(STEPS * 0.5), "uniform:2"))
    for n, s in shorter:
        configs[f"FD {n} steps + {s}"] = ("FD fewer steps", fd(s, steps=n), (s, n))
        configs[f"FD forecast {n} steps + {s}"] = ("FD forecast fewer steps", fd(s, steps=n, propagation="forecast"), (s, n))
    for (c, k), s in calibrated.items():
        if c == "forecast":
            configs[f"FD forecast calibrated, {k} keys"] = ("FD forecast", fd(s, propagation="forecast"), (s, STEPS))
        else:
            configs[f"FD calibrated {c}, {k} keys"] = ("FD", fd(s), (s, STEPS))
    if main_grid:
        for s, label in (("paper", "paper"), ("uniform:3", "uniform:3"), (calibrated["output", 9], "calibrated output, 9 keys")):
            configs[f"FD {label} + injection"] = ("FD+inj", fd(s, 0.003), (s, STEPS))
    for th in (0.1, 0.2, 0.4):
        (ec,) = EasyCacheNode.execute(model, th, 0.15, 0.95, False).result
        configs[f"EasyCache {th}"] = ("EasyCache", plain(STEPS, ec), None)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        configs = {k: v for i, (k, v) in enumerate(configs.items()) if i == 0 or any(w in k for w in wanted)}

    def flops(run):
        with FlopCounterMode(display=False) as fc:
            run([3], 77)
        return fc.get_total_flops()

    def measured_seconds(run):
        times = []
        for _ in range(args.timing_repeats + 1):            # the first is a warm-up
            sync(args.device)
            t0 = time.perf_counter()
            run([3], 77, 32)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    base_name = f"baseline {STEPS} steps"
    base_flops = flops(configs[base_name][1])
    base_seconds = measured_seconds(configs[base_name][1])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU, 1 thread"

    def write_table(spread):
        out.mkdir(parents=True, exist_ok=True)
        spread_text = (f"{kit.fd_name} of the {STEPS}-step baseline over three seed sets: {', '.join(f'{v:.2f}' for v in spread)} "
                       f"(spread {max(spread) - min(spread):.2f})." if spread else "(Seed spread not measured: the run was cut short.)")
        lines = [f"# Quality vs cost: {kit.title} ({args.samples} samples, {SAMPLER}, CFG 3, {STEPS}-step reference)", "",
                 f"Command: `bash tools/run.sh quality {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
                 f"(measured time on: {device}, base 50-step run {base_seconds:.3f} s)", "",
                 spread_text + " Calibrated keys (seed 1000): " + "; ".join(f"{c} {k}: `{v}`" for (c, k), v in calibrated.items())
                 + f" (calibration pass: {args.calibration_samples} samples)", "",
                 f"Cost columns, relative to the {STEPS}-step run: UNet FLOPs; GPU time composed for an SD1.5-class UNet from the "
                 "H100 eager batch-cost curve (parallel decoders); time measured on the device above for this model "
                 "(one image, CFG, parallel decoders).", "",
                 "Rows \"FD ...\": reuse propagation (the paper's); \"FD forecast ...\": forecast propagation (order 1 "
                 "unless \"o2\"); calibrated rows use the Calibrate node's output-error criterion for their propagation.", "",
                 f"| configuration | UNet FLOPs | GPU time (SD1.5 H100, composed) | time measured | {kit.fd_name} ↓ | accuracy | PSNR to {STEPS}-step run |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['cost']:.3f} | {r['gpu']:.3f} | {r['measured']:.3f} | {r['fd']:.2f} | {r['acc']:.1%} | "
                         + ("∞ |" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f} |"))
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    reference, rows = None, []
    for cname, (fam, run, plan) in configs.items():
        t0 = time.perf_counter()
        images = kit.decode(run(classes, 1))
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = images
        mse = float(((images - reference) ** 2).mean())
        cost = flops(run) / base_flops
        if plan is None:          # every UNet call full (fewer steps) or skipped whole (EasyCache): time ~ FLOPs
            gpu = cost
        else:
            gpu = engine.predicted_gpu_fraction(engine.make_plan(plan[0], plan[1])) * plan[1] / STEPS
        rows.append(dict(name=cname, family=fam, cost=cost, gpu=gpu, measured=measured_seconds(run) / base_seconds,
                         fd=frechet(kit.features(images), kit.real), acc=float((kit.classify(images) == np.array(classes)).mean()),
                         psnr=math.inf if mse == 0 else 10 * math.log10(1 / mse), seconds=seconds))
        r = rows[-1]
        print(f"{cname:36s} FLOPs {r['cost']:.3f}  GPU(SD1.5) {r['gpu']:.3f}  measured {r['measured']:.3f}  "
              f"{kit.fd_name} {r['fd']:7.2f}  acc {r['acc']:.0%}  PSNR {r['psnr']:6.2f}  {seconds:5.1f}s", flush=True)
        write_table(None)                      # after every row: a run cut short still leaves its rows
    spread = [frechet(kit.features(kit.decode(configs[base_name][1](classes, s))), kit.real) for s in (2, 3)]
    write_table(spread + [rows[0]["fd"]])
    plot(rows, out / f"{name}_vs_cost.png", title=f"{kit.title}, {SAMPLER} {STEPS} steps")
    print(f"wrote {out / f'{name}.md'} and {out / f'{name}_vs_cost.png'}")


def table_name(model: str, sampler: str, steps: int) -> str:
    base = TABLE_NAME[model]
    return base if (sampler, steps) == ("euler", DEFAULT_STEPS) else f"{base}_{sampler}_{steps}"


def family(name):
    """The plot group of a configuration, from its name in the table."""
    if name.startswith("baseline"):
        return "baseline"
    if name.startswith("EasyCache"):
        return "EasyCache"
    if name.endswith("+ injection"):
        return "FD+inj"
    if name.startswith("FD forecast"):
        words = name.removeprefix("FD forecast ").split()
        return "FD forecast fewer steps" if words and words[0].isdigit() else "FD forecast"
    return "FD fewer steps" if name.split()[1].isdigit() else "FD"


def read_rows(table):
    """The rows of a table written by this script: name, family, cost (FLOPs), gpu, measured, fd, acc, psnr
    (a table of the first version, without the two time columns, gives gpu = measured = None)."""
    rows = []
    for line in Path(table).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (6, 7) or not cells[1].replace(".", "", 1).isdigit():
            continue                                   # the header, its rule, and anything else
        if len(cells) == 6:
            name, cost, _seconds, fd, acc, psnr = cells
            gpu = measured = None
        else:
            name, cost, gpu, measured, fd, acc, psnr = cells
            gpu, measured = float(gpu), float(measured)
        rows.append(dict(name=name, family=family(name), cost=float(cost), gpu=gpu, measured=measured, fd=float(fd),
                         acc=float(acc.rstrip("%")) / 100, psnr=math.inf if psnr == "∞" else float(psnr)))
    return rows


def point_label(name):
    """A short label for a point: 'paper', 'u:3', 'cal 9', '20 steps', 'EC 0.1', ' +inj' where injected."""
    label = (name.removeprefix("FD ").removeprefix("baseline ").replace("uniform:", "u:")
             .replace("calibrated, ", "cal ").replace("calibrated drift, ", "cal-d ").replace("calibrated output, ", "cal-o ").replace(" keys", "").replace("late-dense (paper Non-uniform II)", "late-dense")
             .replace("EasyCache", "EC").replace(" + injection", " +inj").replace("forecast calibrated, ", "fc cal ")
             .replace("forecast ", "fc "))
    return label


DPI = 110


def label_points(ax, points, fontsize=7):
    """Label each (x, y, text, colour) point next to it, moving a label up or down (with a leader line) until
    it overlaps no other label or marker: the FasterDiffusion points crowd into a small range of cost."""
    char_w, line_h = fontsize * DPI / 72 * 0.62, fontsize * DPI / 72 * 1.25     # pixels, roughly
    marker = 5                                                   # half a marker, pixels: labels avoid markers too
    placed = [(px - marker, py - marker, px + marker, py + marker)
              for px, py in (ax.transData.transform((x, y)) for x, y, _, _ in points)]

    def free(box):
        return all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed)
    for x, y, text, color in sorted(points, key=lambda p: (p[0], p[1])):
        px, py = ax.transData.transform((x, y))
        w = char_w * len(text)
        for i in range(80):
            dx, dy = (6, -line_h / 2) if i % 2 == 0 else (-6 - w, -line_h / 2)
            dy += (i // 2 + 1) // 2 * line_h * (1 if (i // 2) % 2 else -1)
            box = (px + dx, py + dy, px + dx + w, py + dy + line_h)
            if free(box):
                break
        placed.append(box)
        moved = abs(dy + line_h / 2) > 1
        ax.annotate(text, (x, y), xytext=(dx, dy + line_h * 0.2), textcoords="offset pixels", fontsize=fontsize,
                    color=color, arrowprops=dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=3)
                    if moved else None)


COST_AXES = (("cost", "UNet FLOPs relative to 50 steps"),
             ("gpu", "GPU time rel. to 50 steps (SD1.5 H100, composed)"),
             ("measured", "time rel. to 50 steps (measured, this model)"))


def plot(rows, path, title="Digits test model"):
    """One panel per (quality metric, cost axis): FD and PSNR against each cost column the table has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axes_x = [(k, label) for k, label in COST_AXES if all(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(2, len(axes_x), figsize=(6.5 * len(axes_x), 10.5), dpi=DPI, squeeze=False)
    style = {"baseline": ("k", "o", "fewer steps (baseline)"), "FD": ("tab:orange", "s", "FasterDiffusion, 50 steps"),
             "FD+inj": ("tab:red", "^", "FasterDiffusion + noise injection"),
             "FD fewer steps": ("tab:green", "v", "FasterDiffusion on fewer steps"), "EasyCache": ("tab:blue", "D", "EasyCache"),
             "FD forecast": ("tab:purple", "P", "FasterDiffusion forecast"),
             "FD forecast fewer steps": ("tab:pink", "X", "FasterDiffusion forecast, fewer steps")}
    metrics = (("fd", "FD (lower is better)"), ("psnr", "PSNR to the full run, dB"))
    for row_axes, (key, label) in zip(axes, metrics):
        for ax, (xkey, xlabel) in zip(row_axes, axes_x):
            for fam, (color, marker, legend) in style.items():
                pts = [r for r in rows if r["family"] == fam and not math.isinf(r[key])]
                ax.scatter([r[xkey] for r in pts], [r[key] for r in pts], c=color, marker=marker, label=legend)
                if fam == "baseline":
                    pts = sorted(pts, key=lambda r: r[xkey])
                    ax.plot([r[xkey] for r in pts], [r[key] for r in pts], c=color, lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    for row_axes, (key, _) in zip(axes, metrics):
        for ax, (xkey, _) in zip(row_axes, axes_x):
            label_points(ax, [(r[xkey], r[key], point_label(r["name"]), style[r["family"]][0])
                              for r in rows if not math.isinf(r[key])])
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: FasterDiffusion (reuse, forecast = fc) vs fewer steps vs EasyCache "
                 "(u:K = uniform:K, cal N = calibrated N keys, EC = EasyCache threshold)")
    fig.savefig(path, dpi=DPI)
    return fig


if __name__ == "__main__":
    main()
