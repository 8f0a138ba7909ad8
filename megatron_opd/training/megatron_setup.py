"""Build the trainable student: Megatron ``GPTModel`` chunks wrapped in Megatron DDP, the Megatron
optimizer and the LR scheduler. The one place the trainer wires Megatron's training machinery."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_opd.models import build_qwen3_model, load_hf_config
from megatron_opd.platform import ParallelState
from megatron_opd.training.config import OPDConfig
from megatron_opd.training.router_load import build_router_load_tracker


@dataclass
class Student:
    model: list  # DDP-wrapped GPTModel chunks (one per virtual pipeline stage)
    optimizer: object
    scheduler: object
    hf_config: object
    vocab_size: int  # real vocabulary (the model pads it to a TP multiple)
    router_load: object = None  # RouterLoadTracker of a MoE student (None: dense)
    uniform_dp_shapes: bool = False
    """Every data-parallel rank must feed micro-batches of the same shape: Megatron's all-gather MoE
    dispatcher all-gathers tokens over the expert ranks and assumes equal counts."""

    def unwrapped(self) -> list:
        return [chunk.module for chunk in self.model]


def build_student(cfg: OPDConfig, state: ParallelState, hf_weights: dict | None,
                  finalize_hook=None, megatron_checkpoint: str | None = None) -> Student:
    """Model + DDP + optimizer + scheduler. The model starts from ``hf_weights`` (HF-named) or from
    ``megatron_checkpoint`` (a ``models.save_checkpoint`` directory, e.g. from tools/convert_hf_to_megatron.py)
    when given, random otherwise.

    ``finalize_hook(model_chunks)`` runs after Megatron's gradient finalisation (DP all-reduce and
    the per-token scaling) and before the optimizer step: the gate normaliser rescales there.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    hf_config = load_hf_config(cfg.model.student_hf)
    dtype = torch.bfloat16 if cfg.model.bf16 else torch.float32
    chunks = build_qwen3_model(hf_config, cfg.parallel, dtype=dtype, moe=cfg.model.moe_options())
    _load_initial_weights(chunks, hf_config, hf_weights, megatron_checkpoint)
    config = chunks[0].config
    # Losses are summed per token; Megatron divides the gradients by the global valid-token count.
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                     disable_bucketing=index > 0)
             for index, chunk in enumerate(chunks)]
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = partial(_finalize, finalize_model_grads, finalize_hook)
    optimizer = _build_optimizer(cfg, model)
    scheduler = _build_scheduler(cfg, optimizer)
    return Student(model=model, optimizer=optimizer, scheduler=scheduler, hf_config=hf_config,
                   vocab_size=hf_config.vocab_size, router_load=build_router_load_tracker(chunks),
                   uniform_dp_shapes=bool(config.num_moe_experts) and config.moe_token_dispatcher_type == "allgather")


def _load_initial_weights(chunks: list, hf_config, hf_weights: dict | None, megatron_checkpoint: str | None) -> None:
    """Must run before the optimizer is built: with --bf16, Megatron's mixed-precision optimizer clones its
    fp32 main parameters from the model when constructed, and every step copies them back into the model,
    so weights loaded later would be replaced by the initial random ones (Megatron-LM calls
    ``reload_model_params()`` after such a load; loading first leaves no stale copy to forget)."""
    from megatron_opd.models import load_checkpoint, load_hf_weights

    if hf_weights is not None and megatron_checkpoint is not None:
        raise ValueError("build_student: give hf_weights or megatron_checkpoint, not both")
    if hf_weights is not None:
        load_hf_weights(chunks, hf_weights, hf_config)
    if megatron_checkpoint is not None:
        load_checkpoint(megatron_checkpoint, chunks)  # collective over all ranks


def _finalize(megatron_finalize, hook, model, num_tokens=None, **kwargs):
    megatron_finalize(model, num_tokens, **kwargs)
    if hook is not None:
        hook(model)


def _build_optimizer(cfg: OPDConfig, model: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = cfg.optim
    config = OptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                             adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
                             clip_grad=opt.clip_grad, bf16=cfg.model.bf16, params_dtype=torch.float32,
                             use_distributed_optimizer=False)
    return get_megatron_optimizer(config, model)


def _build_scheduler(cfg: OPDConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = cfg.optim
    decay_steps = max(opt.train_iters - opt.lr_warmup_iters, 1) + opt.lr_warmup_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt.lr_warmup_iters else opt.lr, max_lr=opt.lr,
        min_lr=opt.min_lr if opt.lr_decay_style != "constant" else opt.lr,
        lr_warmup_steps=opt.lr_warmup_iters, lr_decay_steps=decay_steps, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")
