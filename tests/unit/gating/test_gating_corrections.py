"""IS corrections against exact arithmetic (Python floats), and their mean normalisation through drift_gates."""

import math

import pytest
import torch

from megatron_opd.gating import DriftGateConfig, drift_gates, importance_weights

LOG_RATIO = [[0.5, -0.2, 1.5, -1.0], [0.1, 0.3, -0.9, 0.0]]
MASK = [[True, True, True, False], [True, True, True, True]]
CAP = 2.0


def exact(kind):
    out = []
    for lam_row, m_row in zip(LOG_RATIO, MASK):
        total = sum(lam for lam, m in zip(lam_row, m_row) if m)
        row = []
        for lam, m in zip(lam_row, m_row):
            rho = math.exp(lam)
            if not m:
                row.append(0.0)
            elif kind == "tis":
                row.append(min(rho, CAP))
            elif kind == "masked_is":
                row.append(rho if 1 / CAP <= rho <= CAP else 0.0)
            else:
                row.append(min(math.exp(total), CAP))
        out.append(row)
    return out


@pytest.mark.parametrize("kind", ["tis", "masked_is", "sequence_is"])
def test_weights_match_exact_arithmetic(kind):
    got = importance_weights(torch.tensor(LOG_RATIO, dtype=torch.float64), torch.tensor(MASK), kind, CAP)
    want = exact(kind)
    for g_row, w_row in zip(got.tolist(), want):
        for g, w in zip(g_row, w_row):
            assert g == pytest.approx(w, rel=1e-12, abs=0)


def test_specific_values():
    w = importance_weights(torch.tensor(LOG_RATIO, dtype=torch.float64), torch.tensor(MASK), "masked_is", CAP)
    assert w[0, 2] == 0 and w[1, 2] == 0  # e^1.5 > 2 and e^-0.9 < 1/2: dropped
    t = importance_weights(torch.tensor(LOG_RATIO, dtype=torch.float64), torch.tensor(MASK), "tis", CAP)
    assert t[0, 2] == 2.0  # truncated at C
    s = importance_weights(torch.tensor(LOG_RATIO, dtype=torch.float64), torch.tensor(MASK), "sequence_is", CAP)
    assert s[0, :3].tolist() == [2.0] * 3 and s[1, 0] == pytest.approx(math.exp(-0.5))  # e^0.8 > C: capped


@pytest.mark.parametrize("kind", ["tis", "masked_is", "sequence_is"])
def test_drift_gates_mean_normalises_like_the_gates(kind):
    old = torch.zeros(2, 4)
    cur = torch.tensor(LOG_RATIO, dtype=torch.float32)
    mask = torch.tensor(MASK)
    gates, _ = drift_gates(cur, old, mask, DriftGateConfig(granularity=kind, is_cap=CAP))
    raw = exact(kind)
    valid = [w for w_row, m_row in zip(raw, MASK) for w, m in zip(w_row, m_row) if m]
    mean = sum(valid) / len(valid)
    for g_row, w_row, m_row in zip(gates.tolist(), raw, MASK):
        for g, w, m in zip(g_row, w_row, m_row):
            assert g == pytest.approx(w / mean if m else 0.0, rel=1e-6)
    assert gates[mask].double().mean().item() == pytest.approx(1.0, rel=1e-6)


def test_zero_drift_gives_unit_weights_and_bad_cap_is_named():
    mask = torch.tensor(MASK)
    gates, _ = drift_gates(torch.zeros(2, 4), torch.zeros(2, 4), mask, DriftGateConfig(granularity="tis"))
    assert torch.equal(gates, mask.float())
    with pytest.raises(ValueError, match="is_cap"):
        DriftGateConfig(granularity="tis", is_cap=1.0)
