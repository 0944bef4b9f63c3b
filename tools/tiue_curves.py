"""The TiUE distillation runs side by side: their evaluation curves and gradient balance, from their logs.

    python3 tools/tiue_curves.py LOG.json [LOG.json ...] [--out docs/quality/tiue_runs]

Each log is one written by ``tools/train_tiue.py`` (with ``--eval-every``).  Writes ``<out>.md`` (per run: the
settings as they differ from the paper's recipe, and per evaluation the EMA student's speckle, FD and accuracy, the raw
student's, and the norms of each loss's gradient over the student's weights) and ``<out>.png`` (speckle and FD of
the weights each run exported, EMA or raw, against training steps) when matplotlib is present.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# the paper's recipe (TiUE / SwiftBrush: VSD + KL), as tools/train_tiue.py's flags spell it: a run's settings are
# listed as they differ from it
PAPER = dict(k=4, batch=8, cfg=3.0, vsd=1.0, vsd_weighting="sigma2", kl=0.1, kl_reduce="sum", reg=0.0, lr=1e-5,
             cosine_steps=0, fake_lr=1e-4, fake_steps=4, ema=0.999, grad_clip=1.0, t_min=20, t_max=980, p_null=0.1,
             max_decoder_batch=0, seed=0)
REG_ONLY = ("reg_pairs", "reg_steps", "reg_batch", "reg_hf")      # meaningless without the regression term


def settings(config):
    changed = {k: v for k, v in config.items()
               if PAPER.get(k, object()) != v and (config.get("reg") or k not in REG_ONLY)}
    return "the paper's recipe" + (" but " + ", ".join(f"{k} {v}" for k, v in changed.items()) if changed else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="docs/quality/tiue_runs")
    args = ap.parse_args()
    runs = [(Path(p).stem.removesuffix("_log"), json.loads(Path(p).read_text())) for p in args.logs]
    lines = ["# TiUE distillation runs: evaluation curves", "",
             "Written by `python3 tools/tiue_curves.py " + " ".join(args.logs) + "`. Each evaluation scores the EMA "
             "student's one pass (K = 4, no CFG, fixed noise: seed 0, the same per run) and the raw student's; "
             "speckle = mean squared Laplacian over the real images' (target ≤ 1.5); FD on the log's few samples "
             "(compare within this page, not with the benchmark tables); w_* = each loss's gradient norm over the "
             "student's weights at that step.", ""]
    for name, log in runs:
        t = log.get("teacher_one_pass", {})
        lines += [f"## {name}", "", f"Teacher {log['teacher']}; settings: {settings(log['config'])}; "
                  f"{log['steps']} steps"
                  + (f" in {log['train_seconds'] / 60:.0f} min" if log.get("train_seconds") else "")
                  + f" ({log['device']}, {log['threads']} thread(s); {log.get('stopped_by')})"
                  + (f"; started from {log['init_student']}" if log.get("init_student") else "")
                  + f"; undistilled one pass: speckle {t.get('speckle')}, FD {t.get('fd')}.", ""]
        curves = log.get("every_50", {})
        for key in sorted(k for k in curves if k.startswith("g_") and curves[k]):
            lines.append(f"- {key[2:]}'s gradient on the K decoder outputs (noisiest first), mean of steps 1-50 → "
                         f"last 50: {curves[key][0]} → {curves[key][-1]}")
        lines += ["", "| step | speckle (EMA) | FD (EMA) | accuracy (EMA) | speckle (raw) | FD (raw) | weight gradients |",
                  "|---|---|---|---|---|---|---|"]
        grads = {g["step"]: g for g in log.get("weight_gradients", [])}
        for e in log.get("evals", []):
            raw = e.get("raw", {})
            g = grads.get(e["step"], {})
            gtext = ", ".join(f"{k} {v:.3g}" for k, v in g.items() if k != "step")
            lines.append(f"| {e['step']} | {e['speckle']} | {e['fd']} | {e['accuracy']:.1%} | {raw.get('speckle', '')} | "
                         f"{raw.get('fd', '')} | {gtext} |")
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out.with_suffix('.md')} (no matplotlib: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, log in runs:          # the weights the run exported: the EMA's, or the raw student's
        raw = log.get("exported") == "raw"
        ev = [e.get("raw", {}) if raw else e for e in log.get("evals", [])]
        steps = [e["step"] for e in log.get("evals", [])]
        for ax, key in zip(axes, ("speckle", "fd")):
            ax.plot(steps, [e.get(key) for e in ev], marker=".", label=name + (" (raw)" if raw else ""))
    for ax, key, title in zip(axes, ("speckle", "fd"), ("speckle (real = 1; target ≤ 1.5)", "FD (few samples)")):
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "speckle":
            ax.axhline(1.5, color="k", lw=0.8, ls="--")
        else:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
