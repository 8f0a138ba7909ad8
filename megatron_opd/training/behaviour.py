"""The behaviour policy π_old the objective and the gates compare against (``--logprob-source``).

Under staleness (``--max-staleness K`` ≥ 1) a batch was sampled by older weights than the trainer holds,
so recomputing log π_old with the current weights is wrong. The sources:
- ``recompute``: the trainer recomputes log π_old with the weights *of the sample's own version*. The
  trainer keeps this rank's (local-shard) parameters of the K + 1 newest versions (``WeightSnapshots``; the
  newest equals the live weights) plus one temporary copy of the live ones during a swap: K + 2 copies of
  this rank's parameters in their model dtype at most (Qwen3-1.7B at TP=1 in bf16: 3.4 GB each, CPU or GPU
  memory wherever the parameters live), swapped in for the recompute and restored bit for bit. At K = 0
  no snapshot is kept: today's recompute.
- ``engine``: the rollout engine's own log-probs (no recompute at all).
- ``proximal``: decoupled PPO (AReaL): log π_old = a recompute with the *current* weights (the proximal
  policy π_prox: the trust-region anchor and the policy the gates measure drift from), and the engine's
  log-probs as the behaviour μ; the IS corrections (``--gate tis/masked_is/sequence_is``) then weigh tokens by
  π_prox/μ, the off-policy part. Cheap: one recompute, no snapshot.
"""

from __future__ import annotations

import torch

from megatron_opd.training.step import recompute_logprobs


class WeightSnapshots:
    """Copies of this rank's model parameters by weight version (the K last versions)."""

    def __init__(self, model_chunks: list, keep: int) -> None:
        self.params = [p for chunk in model_chunks for p in chunk.parameters()]
        self.keep = keep
        self.versions: dict[int, list[torch.Tensor]] = {}

    def record(self, version: int) -> None:
        """Snapshot the current parameters as ``version``; drop versions older than the ``keep`` newest."""
        if self.keep == 0:
            return
        self.versions[version] = [p.detach().clone() for p in self.params]
        for old in sorted(self.versions)[:-self.keep]:
            del self.versions[old]

    def recompute_at(self, version: int, recompute):
        """``recompute()`` with the parameters of ``version`` swapped in; the live ones restored after."""
        if version not in self.versions:
            raise KeyError(f"no weight snapshot of version {version} (kept: {sorted(self.versions)})")
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, saved in zip(self.params, self.versions[version]):
                    p.copy_(saved)
            return recompute()
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, live):
                    p.copy_(saved)


def attach_behaviour_logprobs(source: str, run, exp, plan, state, cfg, trainer_version: int, sample_version: int,
                              snapshots: WeightSnapshots | None) -> dict:
    """Fill ``exp.old_logprobs`` (and ``exp.behaviour_logprobs`` for proximal); returns the engine-vs-trainer
    gap metrics when the trainer recomputed."""
    def recompute():
        return recompute_logprobs(run.student, exp, plan, state, cfg.optim.micro_batch_size,
                                  max_tokens=cfg.optim.max_tokens_per_micro_batch, loss=run.loss)

    if source == "engine":
        exp.old_logprobs = exp.engine_logprobs
        return {}
    if source == "proximal":
        exp.old_logprobs, exp.behaviour_logprobs = recompute(), exp.engine_logprobs
        return engine_logprob_gap(exp, "proximal")
    own_weights = sample_version == trainer_version or snapshots is None
    exp.old_logprobs = recompute() if own_weights else snapshots.recompute_at(sample_version, recompute)
    return engine_logprob_gap(exp)


def engine_logprob_gap(exp, label: str = "") -> dict:
    """How far the rollout engine's behaviour log-probs are from the trainer's recompute (max and mean
    |engine − recompute| and the k3 estimate of KL(engine ‖ trainer) = mean(e^d − 1 − d), d = trainer −
    engine, over response tokens). With the sample's own weights it is the train/inference mismatch
    (near 0 on CPU fp32; the anchors report k3 1e-5 to 1e-3 in bf16 on GPU); under ``proximal`` it also
    holds the staleness drift (suffix ``_proximal``)."""
    valid = torch.arange(exp.response_ids.shape[1])[None, :] < exp.response_lens[:, None]
    diff = (exp.old_logprobs - exp.engine_logprobs).double()[valid]
    if diff.numel() == 0:
        return {}
    suffix = f"_{label}" if label else ""
    return {f"engine_logprob_gap_max{suffix}": diff.abs().max().item(),
            f"engine_logprob_gap_mean{suffix}": diff.abs().mean().item(),
            f"engine_logprob_k3{suffix}": (torch.expm1(diff) - diff).mean().item()}
