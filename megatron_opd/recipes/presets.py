"""The variants a study compares and the pairs its report tests: data shared by the runner
(``recipes.variants``) and the report (``recipes.study_report``).

A variant is ``{"name": ..., "flags": {"--flag": value, ...}}`` (``flags`` null = the untrained
student). Presets: ``six`` (the paper's six variants), ``ablations`` (LSM with block sizes
16/32/64/128, token and sequence gates, τ 0.5/1/2/4) and ``async`` (issue 18: rollout staleness
K ∈ {0, 1, 2, 4} × {no gate, Block64, token-level TIS} × {sampled, LSM}).
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK64 = {"--gate": "block", "--gate-block-size": 64}
DEFAULT_VARIANTS: list[dict] = [
    {"name": "base (no training)", "flags": None},
    {"name": "sampled", "flags": {"--objective": "sampled", "--gate": "none"}},
    {"name": "sampled + Block64", "flags": {"--objective": "sampled", **BLOCK64}},
    {"name": "LSM", "flags": {"--objective": "lsm", "--gate": "none"}},
    {"name": "LSM + Block64", "flags": {"--objective": "lsm", **BLOCK64}},
    {"name": "LSM + newline spans", "flags": {"--objective": "lsm", "--gate": "span"}},
]
ABLATION_VARIANTS: list[dict] = [
    {"name": "LSM", "flags": {"--objective": "lsm", "--gate": "none"}},
    {"name": "LSM + token gate", "flags": {"--objective": "lsm", "--gate": "token"}},
    *({"name": f"LSM + Block{n}", "flags": {"--objective": "lsm", "--gate": "block", "--gate-block-size": n}}
      for n in (16, 32, 64, 128)),
    {"name": "LSM + sequence gate", "flags": {"--objective": "lsm", "--gate": "sequence"}},
    *({"name": f"LSM + Block64 τ={tau:g}", "flags": {"--objective": "lsm", **BLOCK64, "--gate-tau": tau}}
      for tau in (0.5, 2.0, 4.0)),
]
STALENESS = (0, 1, 2, 4)
TIS = {"--gate": "tis", "--is-cap": 2.0}  # slime --use-tis / verl rollout_correction default cap


def _async_variants() -> list[dict]:
    """Variant names "<objective>[ + gating] K=<k>"; the behaviour policy is the trainer's recompute with
    the sampling weights (the default --logprob-source recompute)."""
    gatings = (("", {"--gate": "none"}), (" + Block64", BLOCK64), (" + TIS", TIS))
    return [{"name": f"{label}{suffix} K={k}", "flags": {"--objective": objective, **gate, "--max-staleness": k}}
            for k in STALENESS for objective, label in (("sampled", "sampled"), ("lsm", "LSM"))
            for suffix, gate in gatings]


ASYNC_VARIANTS: list[dict] = _async_variants()
# Block64 against no gate and against TIS, per objective and staleness.
ASYNC_PAIRS = [pair for k in STALENESS for label in ("sampled", "LSM")
               for pair in ((f"{label} + Block64 K={k}", f"{label} K={k}"),
                            (f"{label} + Block64 K={k}", f"{label} + TIS K={k}"))]
PRESETS = {"six": DEFAULT_VARIANTS, "ablations": ABLATION_VARIANTS, "async": ASYNC_VARIANTS}
# Paired comparisons reported by default: (variant, reference) when both are in the study.
DEFAULT_PAIRS = [("sampled + Block64", "sampled"), ("LSM + Block64", "LSM"), ("LSM + newline spans", "LSM")]
SFT_CONTROL = "continued SFT (equal wall time)"


def load_variants(spec: str | None, names: list[str] | None) -> list[dict]:
    """A preset name, a JSON file of ``[{name, flags}]``, or None (the six variants)."""
    variants = PRESETS.get(spec or "six")
    if variants is None:
        variants = json.loads(Path(spec).read_text())
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or "name" not in variant or "flags" not in variant:
            raise ValueError(f"{spec or 'six'}[{i}]: each variant needs 'name' and 'flags' (null = untrained)")
    if names:
        unknown = set(names) - {v["name"] for v in variants}
        if unknown:
            raise ValueError(f"--only: unknown variant(s) {sorted(unknown)}; known: {[v['name'] for v in variants]}")
        variants = [v for v in variants if v["name"] in names]
    return variants


def default_pairs(variants: list[dict]) -> list[tuple[str, str]]:
    """Paired comparisons for the report, in variant order: the paper's pairs, and every other LSM
    variant against ungated LSM."""
    names = {v["name"] for v in variants}
    known = dict(DEFAULT_PAIRS)
    if any(name in names for name, _ in ASYNC_PAIRS):
        return [(a, b) for a, b in ASYNC_PAIRS if a in names and b in names]
    pairs = []
    for v in variants:
        name = v["name"]
        if name in known and known[name] in names:
            pairs.append((name, known[name]))
        elif "LSM" in names and name != "LSM" and v["flags"] and v["flags"].get("--objective") == "lsm":
            pairs.append((name, "LSM"))
    return pairs
