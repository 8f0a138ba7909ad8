"""Build everything a run needs from an ``OPDConfig`` (called once, by ``loop.train``).

The objective, engines and batch source are chosen here, so the loop itself has no
``if objective == ...`` branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.data.prompts import load_prompts
from megatron_opd.platform import ParallelState
from megatron_opd.rollout.types import SamplingParams
from megatron_opd.training.checkpoint import find_run_to_resume
from megatron_opd.training.config import ConfigError, OPDConfig
from megatron_opd.training.experience_maker import RolloutExperienceMaker, SFTExperienceMaker
from megatron_opd.training.loss import LossSettings, MicrobatchLoss
from megatron_opd.training.megatron_setup import Student, build_student


@dataclass
class Components:
    student: Student
    loss: MicrobatchLoss
    maker: object  # RolloutExperienceMaker | SFTExperienceMaker
    rollout_engine: object | None
    tokenizer: object
    data_counts: dict


def load_tokenizer(path: str, flag: str = "--student-hf"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - re-raised naming the directory
        raise ConfigError(f"{flag} {path}: cannot load a tokenizer from it ({err})") from err


def special_token_ids(tokenizer, spec: str) -> frozenset[int]:
    """Ids dropped from the loss: 'none', 'auto' (the tokenizer's special and chat/think control tokens,
    EOS included, as in the LSM paper) or comma-separated ids."""
    if spec == "none":
        return frozenset()
    if spec != "auto":
        try:
            return frozenset(int(x) for x in spec.split(",") if x.strip())
        except ValueError as err:
            raise ConfigError(f"--special-token-mask must be auto, none or comma-separated ids, got {spec!r}") from err
    from megatron_opd.objectives import default_special_token_ids

    return frozenset(default_special_token_ids(tokenizer))


def sampling_params(cfg: OPDConfig, tokenizer) -> SamplingParams:
    eng = cfg.engines
    suppress = {t for t in (tokenizer.pad_token_id, tokenizer.bos_token_id)
                if t is not None and t != tokenizer.eos_token_id}
    return SamplingParams(temperature=eng.temperature, top_p=eng.top_p, top_k=eng.top_k,
                          max_new_tokens=eng.max_new_tokens, n=eng.samples_per_prompt,
                          stop_token_ids=(tokenizer.eos_token_id,), suppress_token_ids=tuple(sorted(suppress)))


def _initial_weights(cfg: OPDConfig) -> dict:
    """Where the student's weights come from, as ``build_student`` keywords: none when the run resumes
    (the run checkpoint restores them), else the Megatron checkpoint of --load, else the safetensors
    of --student-hf when it holds any (random weights otherwise)."""
    ckpt = cfg.checkpoint
    if find_run_to_resume(ckpt.save, ckpt.load) is not None:
        return {"hf_weights": None}
    if ckpt.load:
        return {"hf_weights": None, "megatron_checkpoint": ckpt.load}
    if not list(Path(cfg.model.student_hf).glob("*.safetensors")):
        return {"hf_weights": None}
    from megatron_opd.models import read_hf_checkpoint

    return {"hf_weights": read_hf_checkpoint(cfg.model.student_hf)}


def _check_teacher_tokenizer(cfg: OPDConfig, tokenizer) -> None:
    """The teacher must score the student's token ids: same vocabulary, special tokens and chat template."""
    if not cfg.model.teacher_hf:
        return  # an SGLang teacher: its tokenizer is the server's (see docs on serving the same tokenizer)
    from megatron_opd.teacher.consistency import check_tokenizers_agree

    teacher_tokenizer = load_tokenizer(cfg.model.teacher_hf, "--teacher-hf")
    check_tokenizers_agree(tokenizer, teacher_tokenizer, [[{"role": "user", "content": "1+1=?"}]])


def _engines(cfg: OPDConfig, student: Student, tokenizer):
    from megatron_opd.rollout import build_rollout_engine
    from megatron_opd.teacher import build_teacher_engine

    _check_teacher_tokenizer(cfg, tokenizer)
    eng = cfg.engines
    waits = {"timeout_s": eng.sglang_timeout_s, "unreachable_wait_s": eng.sglang_unreachable_wait_s}
    options = {}
    if eng.rollout_url.startswith(("http://", "https://")):
        # SGLang reloads weights from HF safetensors on a path every server can read (the run dir).
        options = {"weight_sync_dir": str(Path(cfg.log.run_dir) / "weight_sync"), "worker_urls":
                   eng.rollout_worker_urls, "weight_sync": eng.weight_sync, **waits,
                   "update_group": (eng.weight_sync_address or None, eng.weight_sync_port,
                                    eng.weight_sync_backend or None)}
    rollout = build_rollout_engine(eng.rollout_url, hf_config=student.hf_config,
                                   vocab_size=student.vocab_size, seed=cfg.optim.seed, **options)
    teacher = build_teacher_engine(eng.teacher_url, model_dir=cfg.model.teacher_hf, vocab_size=student.vocab_size,
                                   temperature=eng.teacher_temperature,
                                   **(waits if eng.teacher_url.startswith(("http://", "https://")) else {}))
    return rollout, teacher


def build_components(cfg: OPDConfig, state: ParallelState) -> Components:
    if state.cp_size > 1:
        raise ConfigError("--context-parallel-size > 1: the trainer's CP data layout is not implemented yet "
                          "(the drift gate supports CP; see megatron_opd.gating)")
    tokenizer = load_tokenizer(cfg.model.student_hf)
    is_sft = cfg.objective.objective == "sft"
    prompts, counts = load_prompts(cfg.data, tokenizer, need_solution=is_sft)
    pad_multiple = state.tp_size if cfg.parallel.sequence_parallel else 1
    loss_holder: list[MicrobatchLoss] = []
    student = build_student(cfg, state, finalize_hook=lambda model: _rescale_grads(model, loss_holder[0], state),
                            **_initial_weights(cfg))
    settings = LossSettings(objective=cfg.objective.objective, gate=cfg.gate, topk=cfg.objective.topk,
                            lsm_tail=cfg.objective.lsm_tail, ppo_clip=cfg.objective.ppo_clip,
                            vocab_size=student.vocab_size, span_delimiter_ids=_span_delimiters(cfg, tokenizer),
                            chunked_head=cfg.model.chunked_head, head_chunk_tokens=cfg.model.head_chunk_tokens,
                            sequence_parallel=cfg.parallel.sequence_parallel)
    loss_holder.append(MicrobatchLoss(settings, state.tp_group, state.dp_cp_group))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if is_sft:
        maker = SFTExperienceMaker(prompts=prompts, tokenizer=tokenizer, batch_size=cfg.engines.prompts_per_rollout,
                                   eos_id=tokenizer.eos_token_id, pad_id=pad_id, seed=cfg.optim.seed,
                                   pad_to_multiple=pad_multiple)
        rollout = None
    else:
        rollout, teacher = _engines(cfg, student, tokenizer)
        maker = RolloutExperienceMaker(
            prompts=prompts, rollout_engine=rollout, teacher_engine=teacher,
            sampling=sampling_params(cfg, tokenizer), prompts_per_rollout=cfg.engines.prompts_per_rollout,
            topk=cfg.objective.topk if cfg.objective.objective == "lsm" else 0, pad_id=pad_id,
            special_token_ids=special_token_ids(tokenizer, cfg.objective.special_token_mask), seed=cfg.optim.seed,
            pad_to_multiple=pad_multiple)
    return Components(student=student, loss=loss_holder[0], maker=maker, rollout_engine=rollout,
                      tokenizer=tokenizer, data_counts=counts)


def _span_delimiters(cfg: OPDConfig, tokenizer) -> frozenset[int]:
    """Ids whose text contains --gate-span-delimiter (decodes the vocab once)."""
    if cfg.gate.granularity != "span":
        return frozenset()
    delimiter = cfg.objective.span_delimiter
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    ids = frozenset(i for i, text in enumerate(texts) if delimiter in text)
    if not ids:
        raise ConfigError(f"--gate-span-delimiter {delimiter!r}: no token of the student tokenizer contains it")
    return ids


def _rescale_grads(model: list, loss: MicrobatchLoss, state: ParallelState) -> None:
    """Exact mean gate normalisation over the whole step: scale grads by Σm / Σmg (see loss.py)."""
    last_rank = dist.get_process_group_ranks(state.pp_group)[-1]
    scale = loss.normalizer.scale(state.pp_group, state.dp_cp_group, last_rank, device=state.device)
    loss.step_gate_scale = scale
    if scale != 1.0:
        for chunk in model:
            chunk.scale_gradients(scale)


def sync_weights(components: Components, version: int | None = None) -> None:
    """Push the student's current weights to the rollout engine (collective over all ranks); ``version``
    names them (samples record it)."""
    if components.rollout_engine is None:
        return
    push_weights(components.rollout_engine, gather_engine_weights(components), version)


def gather_engine_weights(components: Components) -> dict:
    """Collective (the training group): the full HF-named weights, on every rank."""
    from megatron_opd.models import gather_hf_state_dict

    return gather_hf_state_dict(components.student.unwrapped(), components.student.hf_config)


def push_weights(engine, state_dict: dict, version: int | None, group=None) -> None:
    """Load ``state_dict`` into the rollout engine. In-process engines: every rank has its own. SGLang: rank 0
    is the one writer for the shared servers, then a barrier on ``group`` (the asynchronous producer passes
    its own group) so no rank samples before the servers hold the new weights."""
    from megatron_opd.rollout import LocalRolloutEngine

    if isinstance(engine, LocalRolloutEngine):
        with torch.no_grad():
            engine.update_weights(state_dict, weight_version=version)
        return
    if dist.get_rank() == 0:
        engine.update_weights(state_dict, weight_version=None if version is None else f"v{version}")
    dist.barrier(group=group)  # collective
