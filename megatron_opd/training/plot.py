"""``megatron-opd plot RUN_DIR``: PNG plots of a run's ``metrics.jsonl`` (loss, gate statistics,
drift, KL, and pass@k when the run evaluated periodically)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = {
    "loss": ("loss",),
    "gates": ("gate_mean", "gate_std", "gate_min", "gate_max", "gate_raw_below_half"),
    "drift": ("abs_drift_mean", "abs_drift_max"),
    "teacher agreement": ("reverse_kl", "sampled_outside_topk", "student_topk_mass", "topk_overlap"),
    "policy": ("entropy", "clip_fraction", "response_length", "truncation_rate"),
    "MoE router load": ("moe_load_max_over_mean", "moe_load_min_over_mean", "moe_load_cv", "moe_aux_loss"),
    "evaluation": ("eval_pass@1", "eval_pass@8"),
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a megatron-opd run directory?)")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from err
    return rows


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    panels = {title: [k for k in keys if any(k in r for r in rows)] for title, keys in PANELS.items()}
    panels = {title: keys for title, keys in panels.items() if keys}
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, keys) in zip(axes[:, 0], panels.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    out = out or run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a --run-dir of megatron-opd train")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    path = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0
