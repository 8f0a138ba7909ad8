"""The asynchronous rollout source on a fake engine and maker (no process group): fixed-lag versions,
weight syncs that never reach a batch in flight, every slot counted once, staleness asserted."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_opd.training import components as components_module
from megatron_opd.training.async_rollout import (
    AsynchronousRollouts,
    SampleLedgerError,
    SlotLedger,
    StalenessError,
    check_staleness,
    generation_version,
    staleness_metrics,
)

PROMPTS, SAMPLES = 3, 2


class FakeEngine:
    def __init__(self):
        self.version = None
        self.loads = []


class FakeMaker:
    """Generates slowly and records the engine's version at the start and the end of every batch."""

    def __init__(self, engine, duplicate_in=None):
        self.engine, self.duplicate_in, self.seen = engine, duplicate_in, []

    def make(self, batch_index, group=None):
        start = self.engine.version
        time.sleep(0.02)  # the trainer publishes meanwhile
        self.seen.append((batch_index, start, self.engine.version))
        slots = [(batch_index, p, j) for p in range(PROMPTS) for j in range(SAMPLES)]
        if batch_index == self.duplicate_in:
            slots[-1] = slots[0]
        exp = SimpleNamespace(weight_versions=torch.full((len(slots),), start, dtype=torch.long))
        return exp, {"sample_slots": slots}


@pytest.fixture
def fake_run(monkeypatch):
    engine = FakeEngine()

    def push(target, weights, version, group=None):
        assert threading.current_thread().name == "rollout-producer"
        target.loads.append(version)
        target.version = weights["version"]

    monkeypatch.setattr(components_module, "push_weights", push)
    trainer = {"version": 0}
    monkeypatch.setattr(components_module, "gather_engine_weights", lambda run: {"version": trainer["version"]})
    return SimpleNamespace(rollout_engine=engine, maker=FakeMaker(engine)), trainer


@pytest.mark.parametrize("k", [1, 2, 4])
def test_fixed_lag_and_no_sync_reaches_a_batch_in_flight(fake_run, k):
    run, trainer = fake_run
    last = 7
    source = AsynchronousRollouts(run, k, last_batch=last, ledger=SlotLedger(PROMPTS, SAMPLES))
    source.publish(0)
    for b in range(last + 1):
        batch = source.take(b)
        assert batch.version == generation_version(b, k, 0) == max(0, b - k)
        ages = check_staleness(batch.exp.weight_versions, b, k, "test")
        assert ages.tolist() == [min(b, k)] * PROMPTS * SAMPLES
        time.sleep(0.005)  # "training"
        trainer["version"] = b + 1
        source.publish(b + 1)
    source.close()
    assert [s[0] for s in run.maker.seen] == list(range(last + 1))  # each batch once, in order
    assert all(start == end for _, start, end in run.maker.seen), run.maker.seen
    assert source.ledger.consumed == (last + 1) * PROMPTS * SAMPLES
    assert run.rollout_engine.loads == list(range(0, last - k + 1))  # one load per version, between batches


def test_a_duplicated_slot_is_caught(fake_run):
    run, _ = fake_run
    run.maker.duplicate_in = 1
    source = AsynchronousRollouts(run, 1, last_batch=1, ledger=SlotLedger(PROMPTS, SAMPLES))
    source.publish(0)
    source.take(0)
    with pytest.raises(SampleLedgerError, match="consumed twice"):
        source.take(1)
    source.close()


def test_producer_errors_reach_the_trainer(fake_run):
    run, _ = fake_run
    run.maker.make = lambda b, group=None: 1 / 0
    source = AsynchronousRollouts(run, 1, last_batch=3, ledger=SlotLedger(PROMPTS, SAMPLES))
    source.publish(0)
    with pytest.raises(RuntimeError, match="rollout producer failed") as info:
        source.take(0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    source.close()


def test_slot_ledger_counts_and_rejects():
    ledger = SlotLedger(2, 1)
    ledger.consume(0, [(0, 0, 0), (0, 1, 0)])
    assert ledger.consumed == 2
    with pytest.raises(SampleLedgerError, match="consumed twice"):
        ledger.consume(0, [(0, 0, 0), (0, 1, 0)])  # the same batch again
    with pytest.raises(SampleLedgerError, match="1 slots missing"):
        ledger.consume(1, [(1, 0, 0)])


def test_staleness_bound_and_histogram():
    versions = torch.tensor([3, 3, 2, 1])
    ages = check_staleness(versions, 3, 2, "here")
    assert staleness_metrics(ages, 2) == {"staleness_0": 2.0, "staleness_1": 1.0, "staleness_2": 1.0,
                                          "staleness_mean": 0.75, "staleness_max": 2.0}
    with pytest.raises(StalenessError, match=r"\[1\] are outside \[2, 3\]"):
        check_staleness(versions, 3, 1, "here")
    with pytest.raises(StalenessError, match="outside"):
        check_staleness(torch.tensor([4]), 3, 1, "here")  # from the future
    with pytest.raises(StalenessError, match="no weight version"):
        check_staleness(torch.tensor([-1]), 3, 1, "here")
