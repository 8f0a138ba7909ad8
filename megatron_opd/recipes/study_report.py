"""The report of ``megatron-opd variants``: Markdown tables and PNGs from the study record.

Numbers over seeds are mean ± half-width of the Student-t 95% interval (``eval.seed_stats``);
comparisons are paired by seed. Missing (variant, seed) runs are listed, so a partial report says
what it lacks instead of looking complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import megatron_opd
from megatron_opd.eval.seed_stats import all_equal, format_interval, paired_difference, t_interval, verdict
from megatron_opd.recipes.presets import PRESETS, SFT_CONTROL, default_pairs

# Reports name paths inside this checkout relative to it, and the study's own directories by
# placeholders (``data["places"]``, e.g. WORKDIR), never the absolute paths of the machine it ran on.
REPO_ROOT = Path(megatron_opd.__file__).resolve().parent.parent

GATE_PLOT_KEYS = (("abs_drift_mean", "mean |δ| (token)"), ("gate_std", "std of normalised gate ĝ"),
                  ("gate_min", "min ĝ"), ("gate_raw_below_half", "fraction of raw gates g < 0.5"))


def _scores(runs: dict, metric: str) -> dict[int, float]:
    """{seed: test score} of the finished runs (failed ones have no ``test``)."""
    return {int(seed): r["test"][metric] for seed, r in runs.items() if "test" in r}


def _finished(runs: dict) -> dict:
    return {seed: r for seed, r in runs.items() if "test" in r}


def _describe_setup(data: dict) -> str:
    base, ev, n = data["base_flags"], data["eval"], data["n"]
    epochs, minibatches = base.get("--epochs-per-rollout"), base.get("--minibatches-per-rollout")
    sequences = int(base.get("--prompts-per-rollout", 0)) * int(base.get("--samples-per-prompt", 0))
    test = ev["test"]
    lines = [
        f"- Student: `{data['student_hf']}`; teacher: `{base.get('--teacher-hf')}`; training data `{base.get('--data-path')}`.",
        f"- Every trained variant: {base.get('--train-iters')} optimizer steps; each rollout of "
        f"{base.get('--prompts-per-rollout')} prompts × {base.get('--samples-per-prompt')} samples = {sequences} "
        f"responses is reused for {epochs} epochs × {minibatches} minibatches = "
        f"{_product(epochs, minibatches)} optimizer steps (update index 0 … {_product(epochs, minibatches, -1)}); "
        f"max {base.get('--max-new-tokens')} new tokens, temperature {base.get('--temperature', 1.0)}, "
        f"top-K {base.get('--topk')} for LSM.",
        f"- Seeds: {', '.join(map(str, data['seeds']))} (the seed sets the prompt order, the rollout sampling and "
        "the evaluation sampling; every variant uses the same seeds, so differences are paired by seed).",
        f"- Test: {', '.join(test['benchmarks'])}, {test['limit'] or 'all'} problems × {n} samples at temperature 1; "
        f"the headline is the benchmark mean of pass@1 and pass@{n}.",
        "- Intervals: mean ± half-width of the Student-t 95% interval over seeds, t_(0.975, n−1) · s / √n "
        "(not the per-run bootstrap CI over problems).",
    ]
    if data.get("sweep"):
        sweep = data["sweep"]
        val = sweep.get("val") or ev["val"] or {"benchmarks": ["?"], "limit": "?"}
        models = ""
        if sweep.get("student_hf") and (sweep["student_hf"] != data["student_hf"]
                                        or sweep.get("teacher_hf") != base.get("--teacher-hf")):
            models = f" with student `{sweep['student_hf']}` and teacher `{sweep.get('teacher_hf')}`"
        source = f" (from `{sweep['source']}`)" if sweep.get("source") else ""
        lines.append(f"- Learning rate per objective, chosen on the VALIDATION split ({', '.join(val['benchmarks'])}, "
                     f"{val['limit']} problems × {n}) by a sweep of {sweep['iters']} steps, seed {sweep['seed']}, "
                     f"no gate{models}{source}: " + ", ".join(f"{k} {v:g}" for k, v in sweep["chosen"].items()) + ".")
    if ev.get("curve"):
        curve = ev["curve"]
        lines.append(f"- Learning curves: HF snapshots every {data.get('curve_every') or '?'} steps evaluated on "
                     f"{curve['limit']} problems × {n} of {', '.join(curve['benchmarks'])} ({curve['name']}).")
    return "\n".join(lines) + "\n"


def _product(a, b, offset: int = 0):
    try:
        return int(a) * int(b) + offset
    except (TypeError, ValueError):
        return "?"


def _main_table(data: dict) -> str:
    n = data["n"]
    rows = [f"| variant | lr | pass@1 (test) | pass@{n} (test) | seeds | wall s / run |", "|---|---:|---:|---:|---:|---:|"]
    for variant in data["variants"]:
        every = data["results"].get(variant["name"], {})
        runs = _finished(every)
        lr = next((f"{r['lr']:g}" for r in every.values() if r.get("lr") is not None), "—")
        if not runs:
            status = "failed" if every else "not run yet"
            rows.append(f"| {variant['name']} | {lr} | {status} | | 0 | |")
            continue
        walls = [r["wall_s"] for r in runs.values()]
        cells = [format_interval(t_interval(list(_scores(runs, m).values()))) for m in ("pass@1", f"pass@{n}")]
        rows.append(f"| {variant['name']} | {lr} | {cells[0]} | {cells[1]} | {len(runs)} | "
                    f"{sum(walls) / len(walls):.0f} |")
    return "\n".join(rows) + "\n"


def paired_rows(data: dict) -> list[dict]:
    """Per configured pair: paired differences of pass@1 and pass@n over common seeds."""
    n, out = data["n"], []
    for name, reference in data["pairs"]:
        a, b = data["results"].get(name, {}), data["results"].get(reference, {})
        if not (set(a) & set(b)):
            continue
        row = {"pair": f"{name} − {reference}"}
        for metric in ("pass@1", f"pass@{n}"):
            row[metric] = paired_difference(_scores(a, metric), _scores(b, metric))
        out.append(row)
    return out


def _pairs_table(data: dict) -> str:
    n = data["n"]
    rows = [f"| paired difference (same seeds) | Δ pass@1 | Δ pass@{n} | per-seed Δ pass@{n} | verdict on pass@{n} |",
            "|---|---:|---:|---|---|"]
    for row in paired_rows(data):
        diff = row[f"pass@{n}"]
        a_name, b_name = row["pair"].split(" − ")
        per_seed = [data["results"][a_name][str(s)]["test"][f"pass@{n}"] - data["results"][b_name][str(s)]["test"][f"pass@{n}"]
                    for s in diff["seeds"]]
        rows.append(f"| {row['pair']} | {format_interval(row['pass@1'], signed=True)} | "
                    f"{format_interval(diff, signed=True)} | {', '.join(f'{d:+.3f}' for d in per_seed)} | "
                    f"{verdict(diff)} |")
    return "\n".join(rows) + "\n"


def conclusion_lines(data: dict) -> list[str]:
    """One plain sentence per paired comparison: does the first variant beat the second, with the CI."""
    n, lines = data["n"], []
    for row in paired_rows(data):
        diff, first = row[f"pass@{n}"], row["pass@1"]
        name, reference = row["pair"].split(" − ")
        if diff["n"] < 2:
            answer = "cannot say yet (one common seed)"
        elif all_equal(diff):
            answer = f"cannot say (the {diff['n']} paired differences are all equal)"
        elif diff["ci_low"] > 0:
            answer = "**yes**"
        elif diff["ci_high"] < 0:
            answer = "**no, it is worse**"
        else:
            answer = "**no detectable difference**"
        lines.append(f"- Does {name} beat {reference}? {answer}: Δ pass@{n} = {diff['mean']:+.3f}, 95% CI "
                     f"[{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]; Δ pass@1 = {first['mean']:+.3f}, 95% CI "
                     f"[{first['ci_low']:+.3f}, {first['ci_high']:+.3f}] (paired by seed, n = {diff['n']}, Student t).")
    return lines


def _mean_over_seeds(runs: dict, key: str) -> dict[int, float]:
    per_update: dict[int, list[float]] = {}
    for r in runs.values():
        for update, value in r.get("update_stats", {}).get(key, {}).items():
            per_update.setdefault(int(update), []).append(value)
    return {u: sum(v) / len(v) for u, v in sorted(per_update.items())}


def _update_table(data: dict, key: str, label: str) -> str:
    series = {name: _mean_over_seeds(runs, key) for name, runs in data["results"].items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    updates = sorted({u for s in series.values() for u in s})
    rows = [f"| {label} | " + " | ".join(f"u{u}" for u in updates) + " |", "|---|" + "---:|" * len(updates)]
    for name, values in series.items():
        rows.append(f"| {name} | " + " | ".join(f"{values[u]:.4f}" if u in values else "—" for u in updates) + " |")
    return "\n".join(rows) + "\n"


STALENESS_NAME = re.compile(r"^(?P<base>.+) K=(?P<k>\d+)$")


def _by_staleness(data: dict) -> dict[str, dict[int, str]]:
    """{base: {K: variant name}} for variants named "<base> K=<k>" (the async preset); empty unless some
    base was run at two or more K."""
    groups: dict[str, dict[int, str]] = {}
    for name in data["results"]:
        match = STALENESS_NAME.match(name)
        if match:
            groups.setdefault(match["base"], {})[int(match["k"])] = name
    return groups if any(len(ks) > 1 for ks in groups.values()) else {}


def _update_mean(runs: dict, key: str, update: int | None = None) -> float | None:
    """Mean over seeds of ``key`` at one update index (None: averaged over the updates first)."""
    per_update = _mean_over_seeds(runs, key)
    if not per_update:
        return None
    if update is not None:
        return per_update.get(update)
    return sum(per_update.values()) / len(per_update)


def _staleness_tables(data: dict) -> str:
    groups = _by_staleness(data)
    if not groups:
        return ""
    ks = sorted({k for per in groups.values() for k in per})
    head = "| variant | " + " | ".join(f"K={k}" for k in ks) + " |\n|---|" + "---:|" * len(ks)
    n, out = data["n"], []

    def table(title: str, cell) -> None:
        rows = [f"| {base} | " + " | ".join(cell(data["results"][per[k]]) if k in per else "—" for k in ks) + " |"
                for base, per in groups.items()]
        out.append(f"**{title}**\n\n{head}\n" + "\n".join(rows) + "\n")

    def score(metric: str):
        def cell(runs: dict) -> str:
            values = list(_scores(runs, metric).values())
            return format_interval(t_interval(values)) if values else "—"
        return cell

    def stat(key: str, update: int | None = None):
        def cell(runs: dict) -> str:
            value = _update_mean(runs, key, update)
            return "—" if value is None else f"{value:.4f}"
        return cell

    table(f"test pass@{n} (mean ± 95% t-interval over seeds)", score(f"pass@{n}"))
    table("test pass@1", score("pass@1"))
    table("mean |δ| on the first update of a batch (u0: the staleness alone; 0 at K = 0)", stat("abs_drift_mean", 0))
    table("mean |δ| over the updates of a batch", stat("abs_drift_mean"))
    table("std ĝ over the updates of a batch (gated variants)", stat("gate_std"))
    table("min ĝ over the updates of a batch (gated variants)", stat("gate_min"))
    return "\n".join(out)


def _sweep_table(data: dict) -> str:
    sweep, n = data.get("sweep"), data["n"]
    if not sweep:
        return ""
    rows = [f"| objective | lr | validation pass@1 | validation pass@{n} | wall s | chosen |", "|---|---:|---:|---:|---:|---|"]
    for objective, entries in sweep["table"].items():
        for e in entries:
            mark = "✓" if sweep["chosen"][objective] == e["lr"] else ""
            rows.append(f"| {objective} | {e['lr']:g} | {e['pass@1']:.3f} | {e[f'pass@{n}']:.3f} | {e['wall_s']:.0f} | {mark} |")
    return "\n".join(rows) + "\n"


def _control_text(data: dict) -> str:
    runs, cal = data["results"].get(SFT_CONTROL), data.get("sft_calibration")
    if not runs or not cal:
        return ""
    lines = [f"Calibration: SFT start-up {cal['startup_s']:.0f} s, {cal['step_s']:.2f} s per step "
             f"({cal['steps']}-step timed run)."]
    for seed, r in runs.items():
        took = f"in {r['wall_s']:.0f} s" if "wall_s" in r else "and FAILED"
        lines.append(f"- seed {seed}: OPD runs of this seed trained for {r['target_wall_s']:.0f} s on average "
                     f"(worker wall time, start-up excluded); SFT ran {r['sft_steps']} steps {took}.")
    return "\n".join(lines) + "\n"


def _missing(data: dict) -> list[str]:
    out = []
    for variant in data["variants"]:
        runs = data["results"].get(variant["name"], {})
        seeds = [s for s in data["seeds"] if str(s) not in runs]
        failed = [s for s in data["seeds"] if "failed" in runs.get(str(s), {})]
        if seeds:
            out.append(f"{variant['name']}: seeds {', '.join(map(str, seeds))} not run yet")
        if failed:
            out.append(f"{variant['name']}: seeds {', '.join(map(str, failed))} FAILED in training (see study JSON)")
    return out


def format_study(data: dict, title: str) -> str:
    conclusion = conclusion_lines(data)
    parts = [f"# {title}\n", "Reproduce:\n", f"    {data.get('command', '')}\n"]
    if conclusion:
        parts += ["## Answer (paired by seed, 95% Student-t CI)\n", "\n".join(conclusion) + "\n"]
    if data.get("notes"):
        parts += ["## Notes\n", data["notes"].rstrip() + "\n"]
    parts += ["## Setup\n", _describe_setup(data)]
    if data["results"]:  # a sweep-only record has no test results yet
        parts += ["## Test results (mean ± 95% t-interval over seeds)\n", _main_table(data),
                  "## Paired differences\n", _pairs_table(data)]
    missing = _missing(data) if data["results"] else []
    if missing:
        parts += ["**Missing or failed:** " + "; ".join(missing) + "\n"]
    staleness = _staleness_tables(data)
    if staleness:
        parts += ["## By staleness K\n", staleness]
    for key, label in (("abs_drift_mean", "mean |δ| by update index"), ("gate_std", "std ĝ by update index"),
                       ("gate_min", "min ĝ by update index")):
        table = _update_table(data, key, label)
        if table:
            parts += [f"## {label} within a rollout (mean over rollouts and seeds)\n", table]
    if data.get("sweep"):
        parts += ["## Learning-rate sweep (validation split)\n", _sweep_table(data)]
    control = _control_text(data)
    if control:
        parts += ["## Continued-SFT control (equal wall time)\n", control]
    return "\n".join(parts)


def _curves_by_variant(data: dict) -> dict[str, dict[int, list[float]]]:
    n, out = data["n"], {}
    for name, runs in data["results"].items():
        if name == SFT_CONTROL:
            continue  # its steps are SFT steps: not on the same axis
        for r in runs.values():
            for step, scores in r.get("curve", []):
                out.setdefault(name, {}).setdefault(int(step), []).append(scores[f"pass@{n}"])
    return out


def plot_curves(data: dict, path: Path) -> Path | None:
    curves = _curves_by_variant(data)
    if not curves or not data["eval"].get("curve"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for name, points in curves.items():
        steps = sorted(points)
        stats = [t_interval(points[s]) for s in steps]
        means = [s["mean"] for s in stats]
        ax.plot(steps, means, marker="o", label=name)
        if all(s["n"] > 1 for s in stats):
            ax.fill_between(steps, [s["ci_low"] for s in stats], [s["ci_high"] for s in stats], alpha=0.15)
    curve = data["eval"]["curve"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"pass@{data['n']} ({curve['limit']} {curve['name']} problems)")
    ax.set_ylim(bottom=0)
    ax.set_title("pass@k vs step (mean over the seeds with a curve, 95% t band)")
    ax.legend(fontsize="small")
    return _save(fig, path, plt)


def plot_gates(data: dict, path: Path) -> Path | None:
    series = {key: {name: _mean_over_seeds(runs, key) for name, runs in data["results"].items()}
              for key, _ in GATE_PLOT_KEYS}
    if not any(v for per in series.values() for v in per.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(GATE_PLOT_KEYS), figsize=(4.0 * len(GATE_PLOT_KEYS), 3.6))
    # One colour per variant in every panel (ungated variants have no gate series).
    colours = {name: f"C{i}" for i, name in enumerate(data["results"])}
    for ax, (key, label) in zip(axes, GATE_PLOT_KEYS):
        for name, values in series[key].items():
            if values:
                ax.plot(list(values), list(values.values()), marker=".", label=name, color=colours[name])
        ax.set_xlabel("update index within a rollout")
        ax.set_title(label, fontsize="medium")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:  # ungated studies draw no gate series
            ax.legend(fontsize="x-small")
    return _save(fig, path, plt)


def plot_staleness(data: dict, path: Path) -> Path | None:
    """Test pass@n and mean |δ| against the staleness K, one line per "<base>" of "<base> K=<k>" variants."""
    groups = _by_staleness(data)
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    metric = f"pass@{data['n']}"
    for i, (base, per) in enumerate(groups.items()):
        ks = sorted(per)
        stats = [t_interval(list(_scores(data["results"][per[k]], metric).values())) for k in ks]
        done = [(k, s) for k, s in zip(ks, stats) if s["n"]]
        axes[0].errorbar([k + 0.04 * (i - len(groups) / 2) for k, _ in done], [s["mean"] for _, s in done],
                         yerr=[s["half_width"] if s["n"] > 1 else 0.0 for _, s in done], marker="o", capsize=3,
                         label=base, color=f"C{i}")
        drift = [(k, _update_mean(data["results"][per[k]], "abs_drift_mean")) for k in ks]
        drift = [(k, v) for k, v in drift if v is not None]
        if drift:
            axes[1].plot([k for k, _ in drift], [v for _, v in drift], marker="o", label=base, color=f"C{i}")
    axes[0].set_ylabel(f"test {metric} (mean ± 95% t-interval)")
    axes[1].set_ylabel("mean |δ| over the updates of a batch")
    for ax in axes:
        ax.set_xlabel("max staleness K (weight versions)")
    axes[0].legend(fontsize="x-small")
    return _save(fig, path, plt)


def plot_test(data: dict, path: Path) -> Path | None:
    names = [v["name"] for v in data["variants"] if _finished(data["results"].get(v["name"], {}))]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4.0))
    for offset, metric in ((-0.2, "pass@1"), (0.2, f"pass@{data['n']}")):
        stats = [t_interval(list(_scores(data["results"][name], metric).values())) for name in names]
        errors = [0.0 if s["n"] < 2 else s["half_width"] for s in stats]
        ax.bar([i + offset for i in range(len(names))], [s["mean"] for s in stats], 0.4, yerr=errors, capsize=3,
               label=metric)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize="small")
    ax.set_ylabel("test score (mean ± 95% t-interval over seeds)")
    ax.legend()
    return _save(fig, path, plt)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def portable_paths(data: dict) -> dict:
    """``data`` with the machine's absolute paths in every string rewritten: the directories in
    ``data["places"]`` ({placeholder: dir}, e.g. WORKDIR) become their placeholder, and paths inside
    this checkout become relative to it. ``places`` itself is dropped. Longer directories win (a
    workdir inside the checkout is WORKDIR); a directory only matches whole path components."""
    places = {}
    for name, directory in [("", REPO_ROOT), *(data.get("places") or {}).items()]:
        if directory:
            places.update({os.path.abspath(directory): name, os.path.realpath(directory): name})
    alternatives = "|".join(re.escape(d) for d in sorted(places, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])(?P<dir>{alternatives})(?![\w.-])(?P<slash>/?)")

    def replace(match: re.Match) -> str:
        name, slash = places[match.group("dir")], match.group("slash")
        if name:
            return name + slash
        return "" if slash else "."  # inside the checkout: relative to it

    def rewrite(value):
        if isinstance(value, str):
            return pattern.sub(replace, value)
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items() if k != "places"}
        if isinstance(value, (list, tuple)):
            return type(value)(rewrite(v) for v in value)
        return value

    return rewrite(data)


def write_study_report(data: dict, out_dir: Path, name: str = "variants", title: str = "Six-variant study") -> dict:
    """``NAME.md``, ``NAME.json`` and the PNGs (those with data) in ``out_dir``; returns their paths.
    Both files name portable paths (``portable_paths``): reports get committed and shared."""
    out_dir = Path(out_dir)
    data = portable_paths(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{name}.md", "json": out_dir / f"{name}.json"}
    plots = {"curves": plot_curves(data, out_dir / f"{name}_curves.png"),
             "gates": plot_gates(data, out_dir / f"{name}_gates.png"),
             "test": plot_test(data, out_dir / f"{name}_test.png"),
             "staleness": plot_staleness(data, out_dir / f"{name}_staleness.png")}
    paths.update({k: v for k, v in plots.items() if v is not None})
    images = "".join(f"![{k}]({v.name})\n" for k, v in plots.items() if v is not None)
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths["markdown"].write_text(format_study(data, title) + ("\n## Plots\n\n" + images if images else ""))
    return paths


def merge_studies(records: list[dict], preset: str | None = None) -> dict:
    """One study record from several run on disjoint seeds or variants (e.g. seed-parallel processes).

    Results are united per (variant, seed); ``preset`` (six | ablations) fixes the variant list and order,
    else it is the union in order of appearance. Commands are kept, one per input."""
    merged = {**records[0], "results": {}, "commands": [r.get("command", "") for r in records]}
    variants = {}
    for record in records:
        for variant in record["variants"]:
            variants.setdefault(variant["name"], variant)
        for name, runs in record["results"].items():
            merged["results"].setdefault(name, {}).update(runs)
    if preset:
        names = [v["name"] for v in PRESETS[preset]] + ([SFT_CONTROL] if SFT_CONTROL in variants else [])
        merged["variants"] = [variants.get(n, {"name": n, "flags": None}) for n in names]
        merged["results"] = {n: merged["results"][n] for n in names if n in merged["results"]}
    else:
        merged["variants"] = list(variants.values())
    merged["seeds"] = sorted({int(s) for r in records for s in r["seeds"]})
    merged["pairs"] = default_pairs([v for v in merged["variants"] if v["name"] != SFT_CONTROL])
    merged["command"] = "\n    ".join(dict.fromkeys(merged["commands"]))
    return merged


def main(argv: list[str] | None = None) -> int:
    """Re-write a report from its JSON (e.g. after adding notes), or merge several:
    ``python -m megatron_opd.recipes.study_report A.json [B.json ...] [--out DIR/NAME] [--preset six]``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", nargs="+", help="NAME.json files written by megatron-opd variants")
    parser.add_argument("--notes", help="Markdown notes to put near the top")
    parser.add_argument("--title", default="Six-variant study")
    parser.add_argument("--out", help="DIR/NAME of the merged report (default: the first JSON's)")
    parser.add_argument("--preset", choices=("six", "ablations"), help="variant list and order of the merged report")
    args = parser.parse_args(argv)
    records = [json.loads(Path(p).read_text()) for p in args.json]
    data = merge_studies(records, args.preset) if len(records) > 1 or args.preset else records[0]
    if args.notes:
        data["notes"] = Path(args.notes).read_text()
    out = Path(args.out) if args.out else Path(args.json[0]).with_suffix("")
    write_study_report(data, out.parent, out.name, title=args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
