"""Drift gates against an independent loop-based reference, plus hypothesis property tests."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opd.gating import DriftGateConfig, drift_gates, newline_span_ends


def reference_gates(cur, old, mask, cfg, span_ends=None):
    """Plain-Python per-unit loops, straight from DESIGN §2.4."""
    batch, length = cur.shape
    raw = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        unit_of, span = [], 0
        for t in range(length):
            unit_of.append({"token": t, "block": t // cfg.block_size, "sequence": 0, "span": span}[cfg.granularity])
            if span_ends is not None and bool(span_ends[b, t]):
                span += 1
        for unit in set(unit_of):
            members = [t for t in range(length) if unit_of[t] == unit and bool(mask[b, t])]
            if not members:
                continue
            deltas = [float(cur[b, t]) - float(old[b, t]) for t in members]
            agg = {"mean": lambda d: d, "mean_abs": abs, "k3": lambda d: math.expm1(d) - d}[cfg.aggregation]
            drift = sum(agg(d) for d in deltas) / len(deltas)
            gate = math.exp(-cfg.tau * abs(drift)) if cfg.gate_fn == "exp" else float(abs(drift) <= cfg.clip_eps)
            for t in members:
                raw[b][t] = gate
    valid = [raw[b][t] for b in range(batch) for t in range(length) if bool(mask[b, t])]
    mean = sum(valid) / len(valid) if valid else 1.0
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            if bool(mask[b, t]):
                g = raw[b][t] if cfg.normalization == "none" else raw[b][t] / mean if mean > 0 else 0.0
                if cfg.normalization == "clipped":
                    g = min(max(g, cfg.clip_range[0]), cfg.clip_range[1])
                if cfg.normalization == "residual":
                    g = 1 - cfg.residual_alpha + cfg.residual_alpha * g
                out[b, t] = g
    return out


@st.composite
def batches(draw, max_b=3, max_t=20):
    batch, length = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen) * 5
    cur = old + draw(st.sampled_from([0.0, 0.05, 0.5, 2.0])) * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    span_ends = torch.rand(batch, length, generator=gen) < 0.25
    return cur, old, mask, span_ends


configs = st.builds(
    DriftGateConfig,
    granularity=st.sampled_from(["token", "block", "span", "sequence"]),
    block_size=st.integers(1, 8),
    tau=st.sampled_from([0.5, 1.0, 3.0]),
    aggregation=st.sampled_from(["mean", "mean_abs", "k3"]),
    gate_fn=st.sampled_from(["exp", "clip"]),
    clip_eps=st.sampled_from([0.05, 0.3]),
    normalization=st.sampled_from(["mean", "none", "clipped", "residual"]),
    clip_range=st.sampled_from([(0.0, 2.0), (0.5, 1.5)]),
    residual_alpha=st.sampled_from([0.0, 0.3, 1.0]),
)


@settings(max_examples=60, deadline=None)
@given(batches(), configs)
def test_matches_loop_reference(batch, cfg):
    cur, old, mask, span_ends = batch
    gates, stats = drift_gates(cur, old, mask, cfg, span_ends=span_ends)
    torch.testing.assert_close(gates.double(), reference_gates(cur, old, mask, cfg, span_ends), rtol=1e-5, atol=1e-6)
    valid = gates[mask].double()
    if valid.numel():
        torch.testing.assert_close(stats["gate_mean"], valid.mean())
        torch.testing.assert_close(stats["gate_max"], valid.max())
        torch.testing.assert_close(stats["abs_drift_max"], (cur - old).abs()[mask].double().max(), rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches(), configs)
def test_no_drift_gives_unit_gates_and_gates_are_detached(batch, cfg):
    _, old, mask, span_ends = batch
    cur = old.clone().requires_grad_(True)
    gates, stats = drift_gates(cur, old, mask, cfg, span_ends=span_ends)
    assert not gates.requires_grad
    expected = 1.0 if cfg.normalization != "clipped" else min(max(1.0, cfg.clip_range[0]), cfg.clip_range[1])
    assert torch.all(gates[mask] == expected) and torch.all(gates[~mask] == 0)


@settings(max_examples=40, deadline=None)
@given(batches(), configs.filter(lambda c: c.normalization == "mean"))
def test_mean_normalised_gates_average_one(batch, cfg):
    cur, old, mask, span_ends = batch
    gates, _ = drift_gates(cur, old, mask, cfg, span_ends=span_ends)
    if bool(mask.any()) and float(gates[mask].sum()) > 0:
        assert abs(float(gates[mask].double().mean()) - 1.0) < 1e-5


@settings(max_examples=40, deadline=None)
@given(batches(), configs, st.integers(1, 9))
def test_invariant_to_padding(batch, cfg, pad):
    cur, old, mask, span_ends = batch
    gates, _ = drift_gates(cur, old, mask, cfg, span_ends=span_ends)
    nan = torch.full((cur.shape[0], pad), float("nan"))
    padded, _ = drift_gates(torch.cat([cur, nan], 1), torch.cat([old, nan], 1),
                            torch.cat([mask, torch.zeros(cur.shape[0], pad, dtype=torch.bool)], 1), cfg,
                            span_ends=torch.cat([span_ends, torch.ones(cur.shape[0], pad, dtype=torch.bool)], 1))
    torch.testing.assert_close(padded[:, : cur.shape[1]], gates, rtol=0, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(batches())
def test_block_size_edge_cases(batch):
    cur, old, mask, _ = batch
    length = cur.shape[1]
    seq, _ = drift_gates(cur, old, mask, DriftGateConfig(granularity="sequence"))
    big, _ = drift_gates(cur, old, mask, DriftGateConfig(granularity="block", block_size=length + 3))
    tok, _ = drift_gates(cur, old, mask, DriftGateConfig(granularity="token"))
    one, _ = drift_gates(cur, old, mask, DriftGateConfig(granularity="block", block_size=1))
    assert torch.equal(seq, big) and torch.equal(tok, one)
    none, stats = drift_gates(cur, old, mask, DriftGateConfig(granularity="none"))
    assert torch.equal(none, mask.float())


def test_spans_end_at_newline_tokens():
    ids = torch.tensor([[5, 9, 6, 9, 7, 7]])
    ends = newline_span_ends(ids, delimiter_ids={9})
    assert ends.tolist() == [[False, True, False, True, False, False]]
    cur = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.2, 0.4]])
    gates, stats = drift_gates(cur, torch.zeros(1, 6), torch.ones(1, 6, dtype=torch.bool),
                               DriftGateConfig(granularity="span", normalization="none"), span_ends=ends)
    expected = torch.tensor([[1.0, 1.0, math.exp(-1), math.exp(-1), math.exp(-0.3), math.exp(-0.3)]])
    torch.testing.assert_close(gates, expected)
    assert stats["num_units"].item() == 3


def test_newline_span_ends_from_tokenizer():
    class CharTokenizer:
        chars = ["a", "\n", "b", "x\ny"]

        def __len__(self):
            return len(self.chars)

        def batch_decode(self, ids, skip_special_tokens=False):
            return ["".join(self.chars[i] for i in seq) for seq in ids]

    ends = newline_span_ends(torch.tensor([[0, 1, 2, 3, 0]]), tokenizer=CharTokenizer())
    assert ends.tolist() == [[False, True, False, True, False]]


def test_empty_mask_and_bad_inputs():
    cur, old = torch.zeros(2, 4), torch.zeros(2, 4)
    gates, stats = drift_gates(cur, old, torch.zeros(2, 4, dtype=torch.bool), DriftGateConfig())
    assert torch.all(gates == 0) and stats["num_units"].item() == 0 and stats["gate_mean"].item() == 0
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 3\), expected \(2, 4\)"):
        drift_gates(cur, old[:, :3], mask, DriftGateConfig())
    with pytest.raises(ValueError, match="granularity='span' needs span_ends"):
        drift_gates(cur, old, mask, DriftGateConfig(granularity="span"))
    with pytest.raises(ValueError, match=r"not finite at valid position \(1, 2\)"):
        bad = cur.clone()
        bad[1, 2] = float("nan")
        drift_gates(bad, old, mask, DriftGateConfig())
    with pytest.raises(TypeError, match="mask and span_ends must be bool"):
        drift_gates(cur, old, mask.float(), DriftGateConfig())
    for kwargs, field in [({"granularity": "blocks"}, "granularity"), ({"block_size": 0}, "block_size"),
                          ({"tau": -1.0}, "tau"), ({"aggregation": "max"}, "aggregation"),
                          ({"gate_fn": "clip"}, "clip_eps"), ({"normalization": "sum"}, "normalization"),
                          ({"clip_range": (2.0, 1.0)}, "clip_range"), ({"residual_alpha": 1.5}, "residual_alpha")]:
        with pytest.raises(ValueError, match=f"DriftGateConfig.{field}"):
            DriftGateConfig(**kwargs)
