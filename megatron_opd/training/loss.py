"""The loss of one micro-batch in Megatron's ``loss_func`` contract: ``(loss_sum, num_tokens, report)``.

Per position: student log-probs via the vocab-parallel ops → the objective's position loss ℓ_t →
the drift gate g_t (detached) → ``loss_sum = Σ m_t g_t ℓ_t`` and ``num_tokens = Σ m_t``.

Gate normalisation (DESIGN §2.4) divides by the mean gate over the valid positions of the whole
optimizer-step batch, which spans micro-batches and data-parallel ranks. For the default ``mean``
normalisation it is applied exactly and for free: the micro-batches accumulate Σ m g, and after
Megatron's ``finalize_model_grads`` has divided the gradients by the global Σ m, the step scales
them by Σ m / Σ m g (``GateNormalizer``). ``L = Σ m ĝ ℓ / Σ m`` with ĝ = g / mean(g) is exactly
``Σ m g ℓ / Σ m g``. The other normalisations (``clipped``, ``residual``) need ĝ before the loss,
so they normalise over the micro-batch across the data-parallel ranks (documented departure), and
``none`` uses the raw gates: for those the step rescale is 1 (ĝ is already the weight), so ``none``
differs from ``mean`` and ``clipped`` weights stay in their clip range.

Head: by default (``chunked_head``) the last stage returns its final hidden states and this module
computes the output layer and every per-token quantity in token chunks
(``ops.vocab_parallel_head_stats``), so the [b, S, V/tp] logits never exist; with ``--no-chunked-head``
the model returns the logits and the logits ops run on them (the previous path, kept for comparison).

Devices: the micro-batch arrives on the model's device (``training/step.py``) and every tensor
built here is created on the logits' device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_opd import objectives, ops
from megatron_opd.gating import CORRECTIONS, DriftGateConfig, drift_gates, newline_span_ends
from megatron_opd.training.experience import Experience


@dataclass(kw_only=True)
class LossSettings:
    objective: str
    gate: DriftGateConfig
    topk: int = 32
    lsm_tail: bool = False
    ppo_clip: float | None = None
    vocab_size: int
    """Real (unpadded) vocabulary size."""
    span_delimiter_ids: frozenset[int] = frozenset()
    """Token ids that end a span (--gate span): by default every token whose text holds a newline."""
    chunked_head: bool = True
    """The model returns hidden states and the loss runs the output layer in token chunks (--no-chunked-head:
    the model returns logits)."""
    head_chunk_tokens: int | None = None
    """Tokens per chunk of the chunked head (None: ops.chunked_head's default)."""
    sequence_parallel: bool = False
    """The hidden states arrive sequence-sharded over TP (the chunked head gathers them)."""


@dataclass
class GateNormalizer:
    """Σ m g and Σ m of one optimizer step, summed over micro-batches (last pipeline stage only).

    ``enabled`` only for the exact global ``mean`` normalisation; otherwise ``scale`` is 1 and
    no collective runs (the flag comes from the config, so it is the same on every rank).
    """

    enabled: bool = True
    weighted: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def reset(self) -> None:
        self.weighted.zero_()
        self.tokens.zero_()

    def add(self, gates: torch.Tensor, mask: torch.Tensor) -> None:
        # Accumulated on the gates' device: no host sync per micro-batch (one in ``scale``).
        self.weighted = self.weighted.to(gates.device) + torch.where(mask, gates, 0.0).sum().double()
        self.tokens = self.tokens.to(mask.device) + mask.sum().double()

    def scale(self, pp_group, dp_cp_group, pp_last_rank: int, device=None) -> float:
        """Global Σ m / Σ m g; 1 when no position was valid or when disabled. ``device``: where
        collectives run (NCCL: CUDA)."""
        if not self.enabled:
            return 1.0
        both = torch.stack([self.weighted, self.tokens]).to(device or "cpu")
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.broadcast(both, src=pp_last_rank, group=pp_group)  # collective: only the last stage has losses
        if dp_cp_group is not None and dist.get_world_size(dp_cp_group) > 1:
            dist.all_reduce(both, group=dp_cp_group)  # collective: the batch is split over DP (and CP) ranks
        weighted, tokens = both.tolist()  # host sync: one per optimizer step
        return tokens / weighted if weighted > 0 else 1.0


def response_view(full: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Gather sequence-aligned ``full`` [b, S, ...] at response positions [b, T] -> [b, T, ...]."""
    index = positions
    for _ in range(full.dim() - 2):
        index = index.unsqueeze(-1)
    return full.gather(1, index.expand(*positions.shape, *full.shape[2:]))


@dataclass
class StudentView:
    """What the losses need from the student's head, response-aligned: all [b, T] except
    ``at_support`` [b, T, K+1] (logits at the teacher's top-K ids, then at the sampled id);
    ``topk_overlap`` (detached) only when asked for."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    log_normalizer: torch.Tensor
    at_support: torch.Tensor | None = None
    topk_overlap: torch.Tensor | None = None


@dataclass(frozen=True)
class HiddenHead:
    """The chunked head's inputs besides the hidden states: the output layer's weight shard [V_pad/tp, H]."""

    weight: torch.Tensor
    sequence_parallel: bool = False
    chunk_tokens: int | None = None


def _labels_and_support(mb: Experience, with_support: bool, device):
    """Per sequence position: the next token [b, S] and, for LSM, the support ids [b, S, K+1] (zeros off the
    response), plus the response positions [b, T]."""
    labels = torch.roll(mb.input_ids, shifts=-1, dims=1)  # position p predicts token p + 1
    labels[:, -1] = 0  # the last position predicts nothing; 0 is always a valid id
    positions = mb.response_positions()
    support_full = None
    if with_support:
        support = torch.cat([mb.teacher_topk_ids, mb.response_ids.unsqueeze(-1)], dim=-1)  # (b, T, K+1)
        support_full = torch.zeros(*mb.input_ids.shape, support.shape[-1], dtype=torch.long, device=device)
        support_full.scatter_(1, positions.unsqueeze(-1).expand_as(support), support)  # (b, S, K+1)
    return labels, support_full, positions


def student_view(output: torch.Tensor, mb: Experience, tp_group, vocab_size: int, with_support: bool,
                 head: HiddenHead | None = None, with_overlap: bool = False) -> StudentView:
    """log π(y_t), entropy, log Z and, for LSM, the logits at the teacher's support (and the student /
    teacher top-K overlap), in one autograd node.

    output: the (vocab-sharded) logits [b, S, V/tp] when ``head`` is None; else the final hidden states
    [b, S, H] ([b, S/tp, H] with sequence parallelism) and ``head`` the output layer: the chunked head
    then never materialises the logits, and computes only the response tokens (other slots hold 0)."""
    labels, support_full, positions = _labels_and_support(mb, with_support, output.device)
    if head is not None:
        return _chunked_head_stats(output, head, labels, support_full, mb, tp_group, vocab_size, with_overlap)
    stats = ops.vocab_parallel_stats(output, labels, gather_ids=support_full, group=tp_group, vocab_size=vocab_size)
    overlap = topk_overlap_metric(output, mb, tp_group, vocab_size) if with_overlap else None
    return StudentView(logprobs=response_view(stats.logprobs, positions),
                       entropy=response_view(stats.entropy, positions),
                       log_normalizer=response_view(stats.log_normalizer, positions),
                       at_support=None if support_full is None else response_view(stats.gathered_logits, positions),
                       topk_overlap=overlap)


def _chunked_head_stats(hidden, head: HiddenHead, labels, support_full, mb, tp_group, vocab_size, with_overlap):
    """The chunked head on Megatron's [S, b, H] layout (SP shards dim 0), computed only at the response
    tokens each sequence really has (not the prompt, not the right padding); stats as [b, T, ...] with
    zeros at the other response slots (the loss mask is False there)."""
    batch, num_steps = mb.response_ids.shape
    seq_len, tp = mb.input_ids.shape[1], dist.get_world_size(tp_group) if tp_group is not None else 1
    seq_rows = hidden.shape[1] * (tp if head.sequence_parallel else 1)  # hidden: [b, S(/tp), H]
    if seq_rows != seq_len:  # a model/loss disagreement would otherwise surface as an index error deep down
        raise ValueError(f"the model returned hidden states for {hidden.shape[1]} positions of a {seq_len}-token "
                         f"micro-batch with LossSettings.sequence_parallel={head.sequence_parallel} at TP={tp}: "
                         "set sequence_parallel as the model runs it")
    valid = torch.arange(num_steps, device=hidden.device)[None, :] < mb.response_lens[:, None]  # (b, T)
    seq, step = valid.nonzero(as_tuple=True)  # host-device sync: the number of response tokens
    positions = mb.response_positions()[seq, step]  # the position whose logits predict each token
    rows = positions * batch + seq  # rows of the flattened [S, b] tokens
    support = None if support_full is None else support_full[seq, positions]  # (R, K+1)
    overlap_ids = mb.teacher_topk_ids[seq, step] if with_overlap else None  # (R, K)
    stats = ops.vocab_parallel_head_stats(
        hidden.transpose(0, 1), head.weight, labels[seq, positions], support, tp_group, overlap_ids=overlap_ids,
        vocab_size=vocab_size, sequence_parallel=head.sequence_parallel, token_rows=rows, chunk_size=head.chunk_tokens)

    def slots(values):  # (R, ...) -> (b, T, ...), differentiable
        if values is None:
            return None
        empty = values.new_zeros(batch, num_steps, *values.shape[1:])
        return empty.index_put((seq, step), values)

    return StudentView(logprobs=slots(stats.logprobs), entropy=slots(stats.entropy),
                       log_normalizer=slots(stats.log_normalizer), at_support=slots(stats.gathered_logits),
                       topk_overlap=slots(stats.topk_overlap))


def position_loss(settings: LossSettings, view: StudentView, mb: Experience):
    """ℓ_t [b, T] of the configured objective, plus objective-specific metric tensors."""
    if settings.objective == "sft":
        return -view.logprobs, {}
    if settings.objective == "sampled":
        # mask=: padded positions may hold anything; without it a huge value there gives 0·inf = NaN
        # in the backward of the masked sum.
        return objectives.sampled_token_opd_loss(view.logprobs, mb.old_logprobs, mb.teacher_logprobs,
                                                 clip_eps=settings.ppo_clip, mask=mb.loss_mask,
                                                 return_metrics=True)
    return objectives.topk_lsm_loss(
        view.at_support if settings.lsm_tail else view.at_support[..., :-1], mb.teacher_topk_logprobs,
        mask=mb.loss_mask, sampled_ids=mb.response_ids, teacher_topk_ids=mb.teacher_topk_ids,
        teacher_sampled_logprobs=mb.teacher_logprobs, student_log_normalizer=view.log_normalizer,
        return_metrics=True)


def topk_overlap_metric(logits: torch.Tensor, mb: Experience, tp_group, vocab_size: int) -> torch.Tensor:
    """|student top-K ∩ teacher top-K| / K per position [b, T] (one more, gradient-free pass)."""
    with torch.no_grad():
        _, student_top = ops.vocab_parallel_topk(logits.detach(), mb.teacher_topk_ids.shape[-1], group=tp_group,
                                                 vocab_size=vocab_size)
        return objectives.topk_overlap(response_view(student_top, mb.response_positions()), mb.teacher_topk_ids)


class MicrobatchLoss:
    """Builds Megatron ``loss_func``s for micro-batches; owns the step's gate normaliser."""

    def __init__(self, settings: LossSettings, tp_group, dp_cp_group):
        self.settings = settings
        self.tp_group = tp_group
        self.dp_cp_group = dp_cp_group
        exact_mean = settings.gate.normalization == "mean"
        self.normalizer = GateNormalizer(enabled=exact_mean)
        self.step_gate_scale = 1.0
        """Σ m / Σ m g of the last optimizer step (set by the gradient hook; for the gate metrics)."""
        # With exact global mean normalisation the gate function itself must not normalise.
        self.gate_config = dataclasses.replace(settings.gate, normalization="none") if exact_mean else settings.gate
        self.local_gate_norm_group = None if exact_mean else dp_cp_group

    def head(self, weight: torch.Tensor | None) -> HiddenHead | None:
        """The chunked head for the output ``weight`` of a last-stage chunk (None: the model gave logits)."""
        if weight is None:
            return None
        return HiddenHead(weight, self.settings.sequence_parallel, self.settings.head_chunk_tokens)

    def __call__(self, mb: Experience, output_tensor: torch.Tensor, head_weight: torch.Tensor | None = None):
        """output_tensor: logits [b, S, V/tp], or hidden states [b, S(/tp), H] when ``head_weight`` (the
        output layer's weight shard) is given."""
        is_lsm = self.settings.objective == "lsm"
        view = student_view(output_tensor, mb, self.tp_group, self.settings.vocab_size, with_support=is_lsm,
                            head=self.head(head_weight), with_overlap=is_lsm)
        cur, entropy, mask = view.logprobs, view.entropy, mb.loss_mask
        per_pos, metrics = position_loss(self.settings, view, mb)
        if is_lsm:
            metrics["topk_overlap"] = view.topk_overlap
        if mb.old_logprobs is not None and self.settings.gate.granularity != "none":
            span_ends = (newline_span_ends(mb.response_ids, delimiter_ids=self.settings.span_delimiter_ids)
                         if self.settings.gate.granularity == "span" else None)
            target, behaviour = cur.detach(), mb.old_logprobs
            if self.settings.gate.granularity in CORRECTIONS and mb.behaviour_logprobs is not None:
                target, behaviour = mb.old_logprobs, mb.behaviour_logprobs  # proximal: weigh by π_prox / μ
            gates, gate_stats = drift_gates(target, behaviour, mask, self.gate_config,
                                            span_ends=span_ends, dp_group=self.local_gate_norm_group)
        else:
            gates, gate_stats = torch.ones_like(cur), {}
        self.normalizer.add(gates, mask)
        maskf = mask.to(per_pos.dtype)
        loss_sum = torch.where(mask, gates * per_pos, torch.zeros_like(per_pos)).sum()
        num_tokens = mask.sum().to(torch.int)
        report = self._report(mb, cur.detach(), entropy.detach(), per_pos.detach(), gates, maskf, metrics, gate_stats)
        return loss_sum, num_tokens, report

    def _report(self, mb, cur, entropy, per_pos, gates, maskf, metrics, gate_stats) -> dict:
        """Sums (not means) so micro-batches and ranks reduce by addition; the step divides."""
        def msum(x):
            return torch.where(maskf > 0, x, torch.zeros_like(x)).sum().detach().double()

        report = {"tokens": maskf.sum().double(), "loss_sum": msum(per_pos * gates),
                  "entropy_sum": msum(entropy), "gate_weighted": msum(gates)}
        if mb.old_logprobs is not None:
            drift = cur - mb.old_logprobs
            report["abs_drift_sum"] = msum(drift.abs())
            report["abs_drift_max"] = torch.where(maskf > 0, drift.abs(), torch.zeros_like(drift)).max().double()
        if mb.teacher_logprobs is not None and mb.old_logprobs is not None:
            report["reverse_kl_sum"] = msum(mb.old_logprobs - mb.teacher_logprobs)
        for name, value in metrics.items():
            report[f"{name}_sum"] = msum(value) if value.shape == maskf.shape else value.detach().double()
        if gate_stats:
            report["gate_min"] = torch.where(maskf > 0, gates, torch.full_like(gates, float("inf"))).min().double()
            report["gate_max"] = torch.where(maskf > 0, gates, torch.full_like(gates, float("-inf"))).max().double()
            report["gate_sq_sum"] = msum(gates * gates)
            report["gate_below_half_sum"] = msum((gates < 0.5).to(gates.dtype))
        return report
