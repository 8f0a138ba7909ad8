"""One config object for a run: ``OPDConfig``, assembled from small typed sections.

Each section validates itself in ``__post_init__``; checks that span sections live in
``OPDConfig.__post_init__`` and name the command-line flag to change. The config is plain data
(no process groups, no Megatron objects), so it is validated before anything distributed starts
and written as JSON into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_opd.gating import DriftGateConfig
from megatron_opd.models.megatron_config import ROUTER_DTYPES, TOKEN_DISPATCHERS, MoEOptions
from megatron_opd.platform import ParallelConfig

OBJECTIVES = ("sampled", "lsm", "sft")
LOGPROB_SOURCES = ("recompute", "engine", "proximal")
LR_DECAY_STYLES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """An invalid setting; the message names the flag to change."""


def default_gate_granularity(objective: str) -> str:
    """The gate a run gets when none is named: SFT trains on reference solutions, so there is no behaviour
    policy to drift from (none); the OPD objectives get the paper's block gate."""
    return "none" if objective == "sft" else "block"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(kw_only=True)
class ModelConfig:
    student_hf: str | None = None
    """HF directory of the student (config.json + tokenizer; weights used when --load is not given)."""
    teacher_hf: str | None = None
    """HF directory of the teacher, for the in-process teacher engine."""
    bf16: bool = False
    """Train in bf16 (fp32 otherwise; CPU runs use fp32)."""
    chunked_head: bool = True
    """Compute the output layer inside the loss, a chunk of tokens at a time, never materialising the
    [tokens, V/tp] logits (--no-chunked-head: the model returns the logits, the previous path)."""
    head_chunk_tokens: int | None = None
    """Tokens per chunk of the chunked head (default: 2**26 logits' worth, e.g. 441 at V = 151,936, TP 1)."""

    moe_aux_loss_coeff: float = 0.0
    """MoE students: load-balancing aux loss coefficient (0: none, as RL/OPD anchors run)."""
    moe_router_dtype: str = "fp32"
    """MoE students: router precision, fp32 or fp64."""
    moe_token_dispatcher_type: str = "alltoall"
    """MoE students: alltoall or allgather token dispatcher."""

    def __post_init__(self):
        _require(self.head_chunk_tokens is None or self.head_chunk_tokens > 0,
                 f"--head-chunk-tokens must be > 0, got {self.head_chunk_tokens}")
        _require(self.moe_aux_loss_coeff >= 0, "--moe-aux-loss-coeff must be >= 0")
        _require(self.moe_router_dtype in ROUTER_DTYPES, f"--moe-router-dtype must be one of {ROUTER_DTYPES}")
        _require(self.moe_token_dispatcher_type in TOKEN_DISPATCHERS,
                 f"--moe-token-dispatcher-type must be one of {TOKEN_DISPATCHERS}")

    def moe_options(self) -> MoEOptions:
        """The MoE settings as ``models.build_qwen3_model`` takes them (ignored for a dense student)."""
        return MoEOptions(aux_loss_coeff=self.moe_aux_loss_coeff, router_dtype=self.moe_router_dtype,
                          token_dispatcher_type=self.moe_token_dispatcher_type)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    train_iters: int = 200
    """Optimizer steps of the whole run (each rollout gives epochs × minibatches of them)."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one data-parallel rank (when --max-tokens-per-micro-batch is 0)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget per micro-batch ("dynamic batch size"): sequences grouped by length with rows × padded
    length <= this, DP ranks balanced by tokens (training/packing.py); 0: fixed --micro-batch-size."""
    seed: int = 1234

    def __post_init__(self):
        _require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, --lr], got {self.min_lr}")
        _require(self.lr_decay_style in LR_DECAY_STYLES,
                 f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        _require(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _require(self.train_iters > 0, f"--train-iters must be > 0, got {self.train_iters}")
        _require(self.micro_batch_size > 0, "--micro-batch-size must be > 0")
        _require(self.max_tokens_per_micro_batch >= 0, "--max-tokens-per-micro-batch must be >= 0 (0: off)")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/2 must be in [0, 1)")


@dataclass(kw_only=True)
class ObjectiveConfig:
    objective: str = "sampled"
    """sampled (sampled-token OPD), lsm (Teacher-TopK local support matching) or sft (reference solutions)."""
    topk: int = 32
    """K of the teacher's top-K support for lsm."""
    lsm_tail: bool = False
    """lsm: add the sampled token to S_t when it lies outside the teacher's top-K."""
    ppo_clip: float | None = None
    """sampled: PPO clip ε of the importance ratio (None: unclipped)."""
    epochs_per_rollout: int = 2
    minibatches_per_rollout: int = 1
    logprob_source: str = "recompute"
    """recompute log π_old on the trainer with the weights that sampled (no train/inference mismatch), take
    the engine's, or proximal (decoupled PPO: π_old = current weights, the engine's log-probs as behaviour μ;
    see training/behaviour.py)."""
    span_delimiter: str = "\n"
    """--gate span: a span ends at every token whose text contains this string (the paper: newline)."""
    special_token_mask: str = "auto"
    """Ids (comma separated) whose positions are dropped from the loss; auto = the student tokenizer's
    special and chat/think control tokens (EOS included, as the LSM paper does); none = keep all."""

    def __post_init__(self):
        _require(self.objective in OBJECTIVES, f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _require(self.topk >= 1, f"--topk must be >= 1, got {self.topk}")
        _require(self.ppo_clip is None or 0 < self.ppo_clip < 1, f"--ppo-clip must be in (0, 1), got {self.ppo_clip}")
        _require(self.epochs_per_rollout >= 1, "--epochs-per-rollout must be >= 1")
        _require(self.minibatches_per_rollout >= 1, "--minibatches-per-rollout must be >= 1")
        _require(self.logprob_source in LOGPROB_SOURCES,
                 f"--logprob-source must be one of {LOGPROB_SOURCES}, got {self.logprob_source!r}")


@dataclass(kw_only=True)
class EngineConfig:
    rollout_url: str = "local"
    """Comma-separated SGLang URLs (server or router) for student rollouts, or 'local' (in-process)."""
    teacher_url: str = "local"
    """Comma-separated SGLang URLs for teacher scoring, or 'local' (in-process, needs --teacher-hf)."""
    prompts_per_rollout: int = 32
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = -1
    max_new_tokens: int = 1024
    teacher_temperature: float = 1.0
    """Temperature the teacher is scored at; the objectives assume 1 (the teacher's own distribution)."""
    rollout_worker_urls: str = ""
    """With --rollout-url pointing at an sglang-router: its workers (comma separated), which get the
    weight syncs and aborts directly (the router serves neither); empty: the --rollout-url servers."""
    sglang_timeout_s: float = 300.0
    sglang_unreachable_wait_s: float = 300.0
    weight_sync: str = "disk"
    """How SGLang workers get new weights: "disk" (HF safetensors in the run dir, which every worker must
    read) or "distributed" (broadcast over a weight-update group: NCCL on GPUs, gloo on CPU hosts)."""
    weight_sync_address: str = ""
    """--weight-sync distributed: the address rank 0 hosts the update group on (default: its address on
    the route to the first worker)."""
    weight_sync_port: int = 0
    """--weight-sync distributed: the group's port (0: a free one)."""
    weight_sync_backend: str = ""
    """--weight-sync distributed: "nccl" or "gloo" (default: nccl when CUDA is available, else gloo)."""
    max_staleness: int = 0
    """K: generate rollouts ahead while training, from weights at most K versions old (0: synchronous)."""
    rollout_threads: int = 0
    """--max-staleness >= 1: torch threads of the rollout producer thread (0: as many as the trainer)."""

    def __post_init__(self):
        _require(not self.rollout_worker_urls or self.rollout_url.startswith(("http://", "https://")),
                 "--rollout-worker-urls needs SGLang --rollout-url (a router URL)")
        _require(self.sglang_timeout_s > 0, f"--sglang-timeout must be > 0, got {self.sglang_timeout_s}")
        _require(self.sglang_unreachable_wait_s >= 0,
                 f"--sglang-unreachable-wait must be >= 0, got {self.sglang_unreachable_wait_s}")
        _require(self.prompts_per_rollout > 0, "--prompts-per-rollout must be > 0")
        _require(self.samples_per_prompt > 0, "--samples-per-prompt must be > 0")
        _require(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens > 0, "--max-new-tokens must be > 0")
        _require(self.weight_sync in ("disk", "distributed"),
                 f"--weight-sync must be 'disk' or 'distributed', got {self.weight_sync!r}")
        _require(self.weight_sync == "disk" or self.rollout_url.startswith(("http://", "https://")),
                 "--weight-sync distributed needs SGLang --rollout-url (in-process engines share the weights)")
        _require(self.weight_sync_backend in ("", "nccl", "gloo"),
                 f"--weight-sync-backend must be 'nccl' or 'gloo', got {self.weight_sync_backend!r}")
        _require(0 <= self.weight_sync_port < 65536, f"--weight-sync-port must be in [0, 65535], got "
                 f"{self.weight_sync_port}")
        _require(self.max_staleness >= 0, f"--max-staleness must be >= 0, got {self.max_staleness}")
        _require(self.rollout_threads >= 0, f"--rollout-threads must be >= 0, got {self.rollout_threads}")


@dataclass(kw_only=True)
class DataConfig:
    data_path: str | None = None
    """Local JSONL/Parquet file or a hub dataset name; 'toy' = the embedded synthetic task."""
    prompt_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str = "solution"
    """Reference solutions, used by --objective sft."""
    max_prompt_length: int = 1024
    chat_template: bool = True
    enable_thinking: bool = False
    instruction: str = ""
    """Appended to every problem (e.g. 'Put the final answer in \\boxed{}.')."""

    def __post_init__(self):
        _require(self.max_prompt_length > 0, "--max-prompt-length must be > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    save: str | None = None
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    load: str | None = None
    """A Megatron dist checkpoint to start from (weights) or a --save directory to resume."""
    save_hf: str | None = None
    """Export the final student as HF safetensors here."""
    export_hf_at: tuple[int, ...] = ()
    """Also export HF snapshots at these steps (rounded up to rollout boundaries) to RUN_DIR/hf_step<N>."""

    def __post_init__(self):
        _require(self.save_interval >= 0, "--save-interval must be >= 0")
        _require(self.keep_last >= 1, "--keep-last must be >= 1")


@dataclass(kw_only=True)
class LogConfig:
    run_dir: str = "runs/opd"
    log_interval: int = 1
    eval_interval: int = 0
    eval_benchmarks: tuple[str, ...] = ()
    eval_n: int = 8
    tensorboard: bool = False
    wandb_project: str | None = None
    max_bad_steps: int = 5
    """Abort after this many non-finite losses in a row (each one skips its step)."""
    progress: bool = True

    def __post_init__(self):
        _require(self.log_interval >= 1, "--log-interval must be >= 1")
        _require(self.eval_interval >= 0, "--eval-interval must be >= 0")
        _require(self.max_bad_steps >= 1, "--max-bad-steps must be >= 1")


@dataclass(kw_only=True)
class OPDConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gate: DriftGateConfig = field(default_factory=DriftGateConfig)
    engines: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        obj, eng = self.objective, self.engines
        _require(self.model.student_hf is not None or self.checkpoint.load is not None,
                 "set --student-hf (HF config + tokenizer dir of the student)")
        _require(self.model.student_hf is not None, "--student-hf is required: it gives the tokenizer and config")
        if obj.objective != "sft":
            _require(eng.teacher_url != "local" or self.model.teacher_hf is not None,
                     "--teacher-url local needs --teacher-hf (or give SGLang URLs with --teacher-url)")
            rollout_seqs = eng.prompts_per_rollout * eng.samples_per_prompt
            _require(rollout_seqs % obj.minibatches_per_rollout == 0,
                     f"--prompts-per-rollout × --samples-per-prompt = {rollout_seqs} must be divisible by "
                     f"--minibatches-per-rollout = {obj.minibatches_per_rollout}")
        if obj.objective == "sft":
            _require(self.gate.granularity == "none", "--objective sft has no behaviour policy: drop --gate "
                     "(it defaults to none for sft) or set --gate none")
            _require(eng.max_staleness == 0, "--objective sft has no rollouts: set --max-staleness 0")
        per_step = eng.prompts_per_rollout * (1 if obj.objective == "sft" else eng.samples_per_prompt)
        fixed_microbatches = not self.optim.max_tokens_per_micro_batch
        _require(per_step % obj.minibatches_per_rollout == 0 and
                 (not fixed_microbatches or (per_step // obj.minibatches_per_rollout) % self.optim.micro_batch_size == 0),
                 f"a minibatch of {per_step} / {obj.minibatches_per_rollout} sequences (--prompts-per-rollout × "
                 f"--samples-per-prompt / --minibatches-per-rollout) must be a multiple of --micro-batch-size "
                 f"{self.optim.micro_batch_size}")
        _require(self.data.data_path is not None, "set --data-path (a JSONL/Parquet file, a hub dataset, or 'toy')")
        _require(not (self.checkpoint.save_interval and not self.checkpoint.save),
                 "--save-interval needs --save DIR")
        _require(not (self.log.eval_interval and eng.max_staleness),
                 "--eval-interval with --max-staleness >= 1: the rollout engine is busy generating ahead from "
                 "older weights; export snapshots with --export-hf-at and evaluate them with megatron-opd eval")
        _require(not self.log.eval_interval or (self.log.eval_benchmarks and obj.objective != "sft"),
                 "--eval-interval needs --eval-benchmarks (e.g. toy or aime24,aime25,math500,amc23) and an OPD "
                 "objective (it evaluates the rollout engine)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        """Write the effective config as JSON (what the run really used)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, raw: dict) -> OPDConfig:
        """Sections given as dicts -> OPDConfig; a gate without a granularity gets the objective's default."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        raw = _with_default_gate(raw)
        kwargs = {}
        for name, value in raw.items():
            if name not in sections:
                raise ConfigError(f"unknown config section {name!r}")
            section_cls = {"parallel": ParallelConfig, "model": ModelConfig, "optim": OptimConfig,
                           "objective": ObjectiveConfig, "gate": DriftGateConfig, "engines": EngineConfig,
                           "data": DataConfig, "checkpoint": CheckpointConfig, "log": LogConfig}[name]
            kwargs[name] = _build_section(section_cls, name, value)
        return cls(**kwargs)


def _with_default_gate(raw: dict) -> dict:
    gate = raw.get("gate", {})
    objective = raw.get("objective", {})
    if not isinstance(gate, dict) or not isinstance(objective, dict) or "granularity" in gate:
        return raw  # gate named, or a malformed section that _build_section reports
    chosen = objective.get("objective", ObjectiveConfig().objective)
    return {**raw, "gate": {**gate, "granularity": default_gate_granularity(chosen)}}


def _build_section(section_cls, name: str, value: dict):
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} in config section {name!r}")
    value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return section_cls(**value)
