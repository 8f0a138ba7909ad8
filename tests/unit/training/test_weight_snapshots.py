"""WeightSnapshots: a recompute sees the recorded version's parameters; the live ones come back bit for bit."""

import pytest
import torch

from megatron_opd.training.behaviour import WeightSnapshots


def test_recompute_at_an_old_version_and_restore():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    snaps = WeightSnapshots([model], keep=2)
    snaps.record(0)
    outputs = [model(x).detach()]
    for version in (1, 2):
        with torch.no_grad():
            model.weight.add_(0.5)
        snaps.record(version)
        outputs.append(model(x).detach())
    live = [p.detach().clone() for p in model.parameters()]
    assert torch.equal(snaps.recompute_at(1, lambda: model(x).detach()), outputs[1])
    assert not torch.equal(outputs[1], outputs[2])
    assert all(torch.equal(a, b) for a, b in zip(live, model.parameters()))
    with pytest.raises(KeyError, match="version 0"):  # keep=2: version 0 was dropped
        snaps.recompute_at(0, lambda: None)
