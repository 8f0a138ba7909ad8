"""The ``async`` study preset (issue 18): 4 staleness × 3 gatings × 2 objectives, every variant a valid
train config, and the report's pairs: Block64 against no gate and against TIS at each K and objective."""

from megatron_opd.recipes.common import flags_to_argv
from megatron_opd.recipes.presets import PRESETS, default_pairs, load_variants
from megatron_opd.training.cli import parse_config

BASE = {"--student-hf": "/models/student", "--teacher-hf": "/models/teacher", "--data-path": "toy"}


def test_async_preset_grid_and_configs():
    variants = load_variants("async", None)
    assert len(variants) == 24 and len({v["name"] for v in variants}) == 24
    seen = set()
    for v in variants:
        cfg = parse_config(flags_to_argv({**BASE, **v["flags"]}))
        seen.add((cfg.engines.max_staleness, cfg.gate.granularity, cfg.objective.objective))
        assert cfg.objective.logprob_source == "recompute"  # the sample's own weights
    assert seen == {(k, g, o) for k in (0, 1, 2, 4) for g in ("none", "block", "tis") for o in ("sampled", "lsm")}
    assert PRESETS["async"] is not PRESETS["six"]


def test_async_pairs():
    pairs = default_pairs(load_variants("async", None))
    assert len(pairs) == 16
    assert ("LSM + Block64 K=2", "LSM K=2") in pairs and ("sampled + Block64 K=4", "sampled + TIS K=4") in pairs
    subset = load_variants("async", ["sampled K=1", "sampled + Block64 K=1"])
    assert default_pairs(subset) == [("sampled + Block64 K=1", "sampled K=1")]
