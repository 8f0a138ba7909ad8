"""Config / CLI validation: every bad setting is refused before any process group starts, and the
message names the flag to change."""

import json

import pytest

from megatron_opd.training.cli import FLAGS, build_parser, parse_config
from megatron_opd.training.config import ConfigError, OPDConfig

BASE = ["--student-hf", "/models/student", "--teacher-hf", "/models/teacher", "--data-path", "toy"]

# Frozen flag set: adding or renaming a flag is an interface change; update this list on purpose.
FROZEN_FLAGS = sorted(FLAGS)


def test_flag_set_is_frozen():
    expected = {
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--virtual-pipeline-model-parallel-size",
        "--context-parallel-size", "--sequence-parallel", "--distributed-timeout-minutes", "--student-hf", "--teacher-hf", "--bf16",
        "--chunked-head", "--head-chunk-tokens", "--lr",
        "--min-lr", "--lr-warmup-iters", "--lr-decay-style", "--weight-decay", "--clip-grad", "--adam-beta1",
        "--adam-beta2", "--train-iters", "--micro-batch-size", "--max-tokens-per-micro-batch", "--seed", "--save", "--save-interval", "--keep-last",
        "--load", "--save-hf", "--export-hf-at", "--objective", "--topk", "--lsm-tail", "--ppo-clip", "--epochs-per-rollout",
        "--minibatches-per-rollout", "--logprob-source", "--special-token-mask", "--gate", "--gate-block-size",
        "--gate-tau", "--gate-aggregation", "--gate-fn", "--gate-clip-eps", "--gate-normalization", "--gate-clip-range", "--gate-span-delimiter",
        "--gate-residual-alpha", "--rollout-url", "--teacher-url", "--rollout-worker-urls",
        "--sglang-timeout", "--sglang-unreachable-wait", "--prompts-per-rollout", "--samples-per-prompt",
        "--temperature", "--top-p", "--top-k", "--max-new-tokens", "--data-path", "--prompt-field",
        "--answer-field", "--solution-field", "--max-prompt-length", "--chat-template", "--enable-thinking",
        "--instruction", "--run-dir", "--log-interval", "--eval-interval", "--eval-benchmarks", "--eval-n",
        "--tensorboard", "--wandb-project", "--max-bad-steps", "--progress", "--expert-model-parallel-size",
        "--expert-tensor-parallel-size", "--moe-aux-loss-coeff", "--moe-router-dtype", "--moe-token-dispatcher-type",
        "--max-staleness", "--rollout-threads", "--is-cap", "--weight-sync", "--weight-sync-address",
        "--weight-sync-port", "--weight-sync-backend"}
    assert set(FROZEN_FLAGS) == expected


def test_defaults_follow_the_paper():
    cfg = parse_config(BASE)
    assert cfg.objective.epochs_per_rollout == 2
    assert cfg.gate.granularity == "block" and cfg.gate.block_size == 64
    assert cfg.engines.top_p == 0.9 and cfg.engines.temperature == 1.0
    assert cfg.objective.topk == 32


@pytest.mark.parametrize("objective, gate", [("sft", "none"), ("lsm", "block"), ("sampled", "block")])
def test_default_gate_follows_the_objective(objective, gate):
    """--objective sft without --gate must work: SFT has no behaviour policy, so its default gate is none."""
    assert parse_config(BASE + ["--objective", objective]).gate.granularity == gate


def test_explicit_gate_wins_over_the_objective_default():
    assert parse_config(BASE + ["--objective", "sft", "--gate", "none"]).gate.granularity == "none"
    assert parse_config(BASE + ["--objective", "lsm", "--gate", "token"]).gate.granularity == "token"


def test_config_file_without_gate_granularity_follows_its_objective(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"student_hf": "/s"}, "data": {"data_path": "toy"},
                                                 "objective": {"objective": "sft"}, "gate": {"tau": 2.0}}))
    cfg = parse_config(["--config", str(tmp_path / "c.json")])
    assert cfg.gate.granularity == "none" and cfg.gate.tau == 2.0


def test_flags_fill_the_sections():
    cfg = parse_config(BASE + ["--tensor-model-parallel-size", "2", "--objective", "lsm", "--topk", "16",
                               "--gate", "span", "--gate-tau", "2.5", "--lr", "3e-4", "--no-chat-template",
                               "--eval-benchmarks", "aime24,math500", "--seed", "7"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.objective.objective == "lsm" and cfg.objective.topk == 16
    assert cfg.gate.granularity == "span" and cfg.gate.tau == 2.5
    assert cfg.optim.lr == 3e-4 and cfg.data.chat_template is False
    assert cfg.log.eval_benchmarks == ("aime24", "math500")
    assert cfg.parallel.seed == 7 and cfg.optim.seed == 7


@pytest.mark.parametrize("extra, flag", [
    (["--objective", "ppo"], "--objective"),
    (["--lr", "0"], "--lr"),
    (["--top-p", "1.5"], "--top-p"),
    (["--ppo-clip", "2"], "--ppo-clip"),
    (["--epochs-per-rollout", "0"], "--epochs-per-rollout"),
    (["--prompts-per-rollout", "3", "--samples-per-prompt", "3", "--minibatches-per-rollout", "2"],
     "--minibatches-per-rollout"),
    (["--objective", "sft", "--gate", "block"], "--gate none"),
    (["--save-interval", "5"], "--save"),
    (["--lr-decay-style", "exponential"], "--lr-decay-style"),
    (["--logprob-source", "server"], "--logprob-source"),
    (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--export-hf-at", "x"], "--export-hf-at"),
    (["--prompts-per-rollout", "4", "--samples-per-prompt", "2", "--micro-batch-size", "3"], "--micro-batch-size"),
    (["--max-tokens-per-micro-batch", "-1"], "--max-tokens-per-micro-batch"),
    (["--rollout-worker-urls", "http://198.18.0.11:30000"], "--rollout-worker-urls"),  # needs an SGLang --rollout-url
    (["--sglang-timeout", "0"], "--sglang-timeout"),
    (["--sglang-unreachable-wait", "-1"], "--sglang-unreachable-wait"),
    (["--weight-sync", "nccl"], "--weight-sync"),
    (["--weight-sync", "distributed"], "--weight-sync distributed"),  # in-process engines have nothing to sync
    (["--rollout-url", "http://127.0.0.1:1", "--weight-sync", "distributed", "--weight-sync-backend", "mpi"],
     "--weight-sync-backend"),
    (["--rollout-url", "http://127.0.0.1:1", "--weight-sync-port", "70000"], "--weight-sync-port"),
])
def test_invalid_settings_name_the_flag(extra, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-")):
        parse_config(BASE + extra)


def test_local_teacher_needs_teacher_hf():
    with pytest.raises(ConfigError, match="--teacher-hf"):
        parse_config(["--student-hf", "/s", "--data-path", "toy"])


def test_missing_data_path_is_named():
    with pytest.raises(ConfigError, match="--data-path"):
        parse_config(["--student-hf", "/s", "--teacher-hf", "/t"])


@pytest.mark.parametrize("extra, field", [
    (["--gate", "paragraph"], "granularity"),
    (["--gate-block-size", "0"], "block_size"),
    (["--tensor-model-parallel-size", "0"], "tensor_model_parallel_size"),
    (["--gate-fn", "clip"], "clip_eps"),
    (["--gate-normalization", "clipped", "--gate-clip-range", "2,1"], "clip_range"),
])
def test_section_errors_name_the_field(extra, field):
    with pytest.raises(ConfigError, match=field):
        parse_config(BASE + extra)


def test_config_round_trips_through_json(tmp_path):
    cfg = parse_config(BASE + ["--objective", "lsm", "--eval-benchmarks", "toy"])
    cfg.write(tmp_path / "config.json")
    again = OPDConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg


def test_config_file_with_flag_override(tmp_path):
    cfg = parse_config(BASE + ["--lr", "1e-4", "--topk", "8"])
    cfg.write(tmp_path / "c.json")
    again = parse_config(["--config", str(tmp_path / "c.json"), "--topk", "4"])
    assert again.optim.lr == 1e-4 and again.objective.topk == 4


def test_unknown_config_field_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"learning_rate": 1.0}}))
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(["--config", str(tmp_path / "c.json")])


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for flag in FLAGS:
        assert flag in text


def test_token_budget_lifts_the_micro_batch_size_multiple():
    """With --max-tokens-per-micro-batch the minibatch is packed by tokens: --micro-batch-size is unused."""
    cfg = parse_config(BASE + ["--prompts-per-rollout", "4", "--samples-per-prompt", "2", "--micro-batch-size", "3",
                               "--max-tokens-per-micro-batch", "4096"])
    assert cfg.optim.max_tokens_per_micro_batch == 4096
    assert parse_config(BASE).optim.max_tokens_per_micro_batch == 0  # off by default


def test_max_staleness_flags_and_their_conflicts():
    cfg = parse_config(BASE + ["--max-staleness", "2", "--rollout-threads", "1", "--gate", "tis", "--is-cap", "3"])
    assert (cfg.engines.max_staleness, cfg.engines.rollout_threads, cfg.gate.granularity, cfg.gate.is_cap) == (
        2, 1, "tis", 3.0)
    assert parse_config(BASE).engines.max_staleness == 0
    with pytest.raises(ConfigError, match="--max-staleness must be >= 0"):
        parse_config(BASE + ["--max-staleness", "-1"])
    with pytest.raises(ConfigError, match="--eval-interval with --max-staleness"):
        parse_config(BASE + ["--max-staleness", "1", "--eval-interval", "2", "--eval-benchmarks", "toy"])
    with pytest.raises(ConfigError, match="sft has no rollouts"):
        parse_config(BASE + ["--objective", "sft", "--max-staleness", "1"])


def test_distributed_weight_sync_flags_reach_the_engine_options():
    cfg = parse_config(BASE + ["--rollout-url", "http://198.18.0.11:30000", "--weight-sync", "distributed",
                               "--weight-sync-address", "198.18.0.14", "--weight-sync-port", "29650",
                               "--weight-sync-backend", "gloo"])
    eng = cfg.engines
    assert (eng.weight_sync, eng.weight_sync_address, eng.weight_sync_port, eng.weight_sync_backend) == (
        "distributed", "198.18.0.14", 29650, "gloo")
    assert parse_config(BASE).engines.weight_sync == "disk"


def test_chunked_head_is_the_default_and_can_be_turned_off(tmp_path):
    base = ["--student-hf", str(tmp_path), "--data-path", "toy", "--teacher-hf", str(tmp_path)]
    cfg = parse_config(base)
    assert cfg.model.chunked_head and cfg.model.head_chunk_tokens is None
    cfg = parse_config(base + ["--no-chunked-head", "--head-chunk-tokens", "256"])
    assert not cfg.model.chunked_head and cfg.model.head_chunk_tokens == 256
    with pytest.raises(ConfigError, match="--head-chunk-tokens"):
        parse_config(base + ["--head-chunk-tokens", "0"])
