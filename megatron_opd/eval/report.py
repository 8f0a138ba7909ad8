"""Reports: results JSON, Markdown tables (one run; runs compared like the paper's table), bar charts.

A results dict (see ``evaluate``) holds ``benchmarks[name]["metrics"][metric] = {value, ci_low,
ci_high}`` and ``mean["metrics"][metric]`` likewise. Comparison tables put runs in rows and the
benchmarks plus their mean in columns, as in the paper (pass@8 by default).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

MEAN_COLUMN = "mean"


def write_grades(path: Path, lines: list[dict], verdicts: list[list[str]]) -> None:
    """Per-problem verdicts (re-written on every grading; the generations file is the raw record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for line, vs in zip(lines, verdicts):
            f.write(json.dumps({"id": line["id"], "answer": line["answer"], "verdicts": vs,
                                "num_correct": sum(v == "correct" for v in vs)}) + "\n")


def load_results(path: str | Path) -> dict:
    """A ``results.json`` (or the run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path} (run the evaluation first)")
    return json.loads(path.read_text())


def _metric_names(results: dict) -> list[str]:
    names = next(iter(results["benchmarks"].values()))["metrics"].keys()
    return sorted(names, key=lambda m: (m.split("@")[0] != "pass", int(m.split("@")[1])))


def _cell(entry: Mapping | None, digits: int = 4, ci: bool = True) -> str:
    if entry is None:
        return "—"
    text = f"{entry['value']:.{digits}f}"
    return f"{text} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]" if ci else text


def format_run_table(results: dict) -> str:
    """Markdown: one row per benchmark (+ the mean), one column per metric, 95% bootstrap CIs."""
    metrics = _metric_names(results)
    rows = ["| benchmark | problems | " + " | ".join(metrics) + " | truncated | no answer | timeout |",
            "|---|---:|" + "---:|" * (len(metrics) + 3)]
    for name, bench in results["benchmarks"].items():
        verdicts, samples = bench["verdicts"], max(bench["num_samples"], 1)
        rows.append(f"| {name} | {bench['num_problems']} | "
                    + " | ".join(_cell(bench["metrics"][m]) for m in metrics)
                    + f" | {verdicts['truncated'] / samples:.1%} | {verdicts['no_answer'] / samples:.1%}"
                    + f" | {verdicts['timeout']} |")
    mean = results["mean"]
    rows.append(f"| **{MEAN_COLUMN}** ({', '.join(mean['benchmarks'])}) | | "
                + " | ".join(_cell(mean["metrics"].get(m)) for m in metrics) + " | | | |")
    return "\n".join(rows) + "\n"


def _columns(runs: Mapping[str, dict]) -> list[str]:
    names: list[str] = []
    for results in runs.values():
        names += [b for b in results["benchmarks"] if b not in names]
    return names + [MEAN_COLUMN]


def _entry(results: dict, column: str, metric: str) -> Mapping | None:
    if column == MEAN_COLUMN:
        return results["mean"]["metrics"].get(metric)
    bench = results["benchmarks"].get(column)
    return None if bench is None else bench["metrics"].get(metric)


def format_comparison_table(runs: Mapping[str, dict], metric: str = "pass@8", ci: bool = False) -> str:
    """Markdown, laid out like the paper: rows = runs (variants), columns = benchmarks + mean."""
    columns = _columns(runs)
    rows = [f"| {metric} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for run, results in runs.items():
        rows.append(f"| {run} | " + " | ".join(_cell(_entry(results, c, metric), ci=ci) for c in columns) + " |")
    return "\n".join(rows) + "\n"


def plot_comparison(runs: Mapping[str, dict], path: str | Path, metric: str = "pass@8") -> Path:
    """Grouped bar chart (groups = benchmarks + mean, one bar per run) with 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    columns = _columns(runs)
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) * max(1, len(runs)) ** 0.5), 4.0))
    for i, (run, results) in enumerate(runs.items()):
        entries = [_entry(results, c, metric) for c in columns]
        values = [e["value"] if e else 0.0 for e in entries]
        errors = [[e["value"] - e["ci_low"] if e else 0.0 for e in entries],
                  [e["ci_high"] - e["value"] if e else 0.0 for e in entries]]
        xs = [c + (i - (len(runs) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=run)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{metric} (95% bootstrap CI)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_run_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``pass_at_k.png`` (largest k) of one run in ``out_dir``."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "pass_at_k.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    metric = [m for m in _metric_names(results) if m.startswith("pass@")][-1]
    paths["markdown"].write_text(f"# Evaluation: {results['run_name']}\n\n" + format_run_table(results))
    plot_comparison({results["run_name"]: results}, paths["plot"], metric=metric)
    return paths


def write_comparison(runs: Mapping[str, dict], out_dir: str | Path, metric: str = "pass@8") -> dict[str, Path]:
    """``comparison.md`` (runs × benchmarks + mean) and ``comparison.png`` for several runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "comparison.md", "plot": out / "comparison.png"}
    paths["markdown"].write_text(format_comparison_table(runs, metric) + "\n"
                                 + format_comparison_table(runs, metric, ci=True))
    plot_comparison(runs, paths["plot"], metric=metric)
    return paths


def aggregate_seeds(runs_by_variant: Mapping[str, list[dict]], metric: str = "pass@8") -> dict[str, dict]:
    """Mean and spread over seeds: ``{variant: {column: {mean, std, min, max, values}}}``.

    ``runs_by_variant[v]`` holds one results dict per seed; ``std`` is the sample standard deviation
    (ddof=1; 0 for a single seed). Columns are the benchmarks plus ``mean``.
    """
    import numpy as np

    out = {}
    for variant, seed_runs in runs_by_variant.items():
        if not seed_runs:
            raise ValueError(f"aggregate_seeds: variant {variant!r} has no runs")
        out[variant] = {}
        for column in _columns({str(i): r for i, r in enumerate(seed_runs)}):
            values = [e["value"] for e in (_entry(r, column, metric) for r in seed_runs) if e is not None]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[variant][column] = {"mean": float(np.mean(values)), "std": std, "min": min(values),
                                    "max": max(values), "values": values}
    return out


def format_seed_table(aggregated: Mapping[str, dict], metric: str = "pass@8", digits: int = 3) -> str:
    """Markdown of ``aggregate_seeds``: rows = variants, columns = benchmarks + mean, cells mean ± std."""
    columns: list[str] = []
    for cols in aggregated.values():
        columns += [c for c in cols if c not in columns and c != MEAN_COLUMN]
    columns.append(MEAN_COLUMN)
    rows = [f"| {metric} (mean ± std over seeds) | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns)]
    for variant, cols in aggregated.items():
        cells = [f"{cols[c]['mean']:.{digits}f} ± {cols[c]['std']:.{digits}f} (n={len(cols[c]['values'])})"
                 if c in cols else "—" for c in columns]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
