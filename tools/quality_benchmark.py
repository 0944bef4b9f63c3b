"""Quality vs cost on the trained digits model: does FasterDiffusion beat simply running fewer steps?

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/quality_benchmark.py [--samples 600] [--out docs/quality]   (~30 min)

Every configuration samples the same seeds (``--samples`` images, equal per digit) through ComfyUI and is scored
  * FD-digits: Frechet distance between features of generated and held-out real digits, in the hidden layer
    of an MLP trained on the other real digits (an FID analogue; lower is better);
  * accuracy of a separate classifier (an SVM) on the generated digits;
  * PSNR to the 50-step full run on the same seeds (fidelity);
  * cost: UNet FLOPs counted by torch's FlopCounterMode over a whole sampling run, relative to the 50-step
    run, and wall time.
Writes ``quality.md`` (table) and ``quality_vs_cost.png`` (plot) into ``--out``; ``--replot`` only redraws the
plot from the table already in ``--out`` (seconds).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("quality")         # says which interpreter to use when this one has no torch
import testmodel as tm  # noqa: E402

STEPS = 50
# the paper's Non-uniform II shape (Table 5, sparse early / dense late): t {50,30,25,20,15,14,5,4,3}
LATE_DENSE = "0,20,25,30,35,36,45,46,47"


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=600)   # FD-digits seed spread ~2 at 600, ~12 at 200
    ap.add_argument("--out", default=str(tm.REPO / "docs" / "quality"))
    ap.add_argument("--replot", action="store_true", help="redraw quality_vs_cost.png from the saved quality.md")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        plot(read_rows(out / "quality.md"), out / "quality_vs_cost.png")
        print(f"wrote {out / 'quality_vs_cost.png'} from {out / 'quality.md'}")
        return
    tm.boot_comfy()
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import comfy.samplers
    import comfy.utils
    import nodes
    from comfy_extras.nodes_easycache import EasyCacheNode
    from importlib import import_module
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    comfy.utils.set_progress_bar_enabled(False)
    Apply, cu = tm.load_pack(tempfile.mkdtemp())
    calibration = import_module(cu.__name__.rsplit(".", 1)[0] + ".comfy_calibrate")
    from fasterdiffusion import choose_keys
    model, tokens = tm.load_test_model()
    digits = [d % 10 for d in range(args.samples)]
    features, real = feature_space()

    # calibrate on other seeds than the scored ones
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    rec_model, recorder = calibration.recording_model(model, sigmas.tolist())
    tm.sample_digits(rec_model, tokens, list(range(10)), seed=1000, steps=STEPS)
    drift = recorder.drift()
    calibrated = {k: ",".join(map(str, choose_keys(drift, STEPS, k))) for k in (9, 13, 17)}

    ks = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]

    def fd_run(strategy, alpha):
        def run(digs, seed):
            pos, neg = tm.digit_conditioning(tokens, digs)
            latent = {"samples": torch.zeros(len(digs), 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}
            return ks.execute(model, seed, STEPS, 3.0, "euler", "normal", pos, neg, latent, 1.0, strategy, True, 0,
                             alpha, 500.0)[0]["samples"]
        return run

    def steps_run(n, m=model):
        return lambda digs, seed: tm.sample_digits(m, tokens, digs, seed=seed, steps=n)

    configs = {f"baseline {n} steps": ("baseline", steps_run(n)) for n in (50, 30, 25, 20, 15, 10)}
    for s in ["paper", "uniform:2", "uniform:3", "uniform:4", "uniform:5", "uniform:6", LATE_DENSE]:
        name = "late-dense (paper Non-uniform II)" if s == LATE_DENSE else s
        configs[f"FD {name}"] = ("FD", fd_run(s, 0.0))
    for k, s in calibrated.items():
        configs[f"FD calibrated, {k} keys"] = ("FD", fd_run(s, 0.0))
    for s, name in (("paper", "paper"), ("uniform:3", "uniform:3"), (calibrated[9], "calibrated, 9 keys")):
        configs[f"FD {name} + injection"] = ("FD+inj", fd_run(s, 0.003))
    for th in (0.1, 0.2, 0.4):
        (ec,) = EasyCacheNode.execute(model, th, 0.15, 0.95, False).result
        configs[f"EasyCache {th}"] = ("EasyCache", steps_run(STEPS, ec))

    def flops(run):
        with FlopCounterMode(display=False) as fc:
            run([3], 77)
        return fc.get_total_flops()

    base_flops = flops(configs["baseline 50 steps"][1])
    reference = None
    rows = []
    for name, (family, run) in configs.items():
        t0 = time.perf_counter()
        images = tm.decode(run(digits, 1))
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = images
        mse = float(((images - reference) ** 2).mean())
        feats = features(to8(images))
        rows.append(dict(name=name, family=family, cost=flops(run) / base_flops, seconds=seconds,
                         fd=frechet(feats, real), acc=float((tm.classify(images) == np.array(digits)).mean()),
                         psnr=math.inf if mse == 0 else 10 * math.log10(1 / mse)))
        print(f"{name:36s} cost {rows[-1]['cost']:.3f}  FD-digits {rows[-1]['fd']:7.2f}  acc {rows[-1]['acc']:.0%}  "
              f"PSNR {rows[-1]['psnr']:6.2f}  {seconds:5.1f}s", flush=True)
    # run-to-run spread of the distribution metric: the 50-step baseline on 2 more seed sets
    spread = [frechet(features(to8(tm.decode(configs["baseline 50 steps"][1](digits, s)))), real) for s in (2, 3)]
    spread.append(rows[0]["fd"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Quality vs cost on the digits test model ({args.samples} samples, euler, CFG 3, 50-step reference)", "",
             f"Command: `OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/quality_benchmark.py --samples {args.samples}`", "",
             f"FD-digits of the 50-step baseline over three seed sets: {', '.join(f'{v:.2f}' for v in spread)} "
             f"(spread {max(spread) - min(spread):.2f}). Calibrated keys (from seeds 1000-1009): "
             + "; ".join(f"{k}: `{v}`" for k, v in calibrated.items()), "",
             "| configuration | UNet FLOPs | wall s | FD-digits ↓ | accuracy | PSNR to 50-step run |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['cost']:.3f} | {r['seconds']:.1f} | {r['fd']:.2f} | {r['acc']:.0%} | "
                     + ("∞ |" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f} |"))
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "quality_vs_cost.png")
    print(f"wrote {out / 'quality.md'} and {out / 'quality_vs_cost.png'}")


def family(name):
    """The plot group of a configuration, from its name in the table."""
    if name.startswith("baseline"):
        return "baseline"
    if name.startswith("EasyCache"):
        return "EasyCache"
    return "FD+inj" if name.endswith("+ injection") else "FD"


def read_rows(table):
    """The rows of a quality.md written by this script (name, family, cost, seconds, fd, acc, psnr)."""
    rows = []
    for line in Path(table).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[1].replace(".", "", 1).isdigit():
            continue                                   # the header, its rule, and anything else
        name, cost, seconds, fd, acc, psnr = cells
        rows.append(dict(name=name, family=family(name), cost=float(cost), seconds=float(seconds), fd=float(fd),
                         acc=float(acc.rstrip("%")) / 100, psnr=math.inf if psnr == "∞" else float(psnr)))
    return rows


def point_label(name):
    """A short label for a point: 'paper', 'u:3', 'cal 9', '20 steps', 'EC 0.1', ' +inj' where injected."""
    label = (name.removeprefix("FD ").removeprefix("baseline ").replace("uniform:", "u:")
             .replace("calibrated, ", "cal ").replace(" keys", "").replace("late-dense (paper Non-uniform II)", "late-dense")
             .replace("EasyCache", "EC").replace(" + injection", " +inj"))
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


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), dpi=DPI)
    style = {"baseline": ("k", "o", "fewer steps (baseline)"), "FD": ("tab:orange", "s", "FasterDiffusion"),
             "FD+inj": ("tab:red", "^", "FasterDiffusion + noise injection"), "EasyCache": ("tab:blue", "D", "EasyCache")}
    for ax, key, label in ((axes[0], "fd", "FD-digits (lower is better)"), (axes[1], "psnr", "PSNR to the 50-step run, dB")):
        for fam, (color, marker, legend) in style.items():
            pts = [r for r in rows if r["family"] == fam and not math.isinf(r[key])]
            ax.scatter([r["cost"] for r in pts], [r[key] for r in pts], c=color, marker=marker, label=legend)
            if fam == "baseline":
                pts = sorted(pts, key=lambda r: r["cost"])
                ax.plot([r["cost"] for r in pts], [r[key] for r in pts], c=color, lw=0.8)
        ax.set_xlabel("UNet FLOPs relative to 50 steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    for ax, key in ((axes[0], "fd"), (axes[1], "psnr")):
        label_points(ax, [(r["cost"], r[key], point_label(r["name"]), style[r["family"]][0])
                          for r in rows if not math.isinf(r[key])])
    axes[0].legend(fontsize=8)
    fig.suptitle("Digits test model: FasterDiffusion vs fewer steps vs EasyCache "
                 "(u:K = uniform:K, cal N = calibrated N keys, EC = EasyCache threshold)")
    fig.savefig(path, dpi=DPI)
    return fig


if __name__ == "__main__":
    main()
