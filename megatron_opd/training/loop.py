"""The OPD training loop: rollout → teacher → recompute log π_old → E epochs × M minibatches of
optimizer steps with drift gates → weight sync → checkpoint / eval. Reads like the algorithm.

Checkpoints are taken at rollout boundaries only (after the weight sync), so a resumed run needs
no rollout data: the next batch is a pure function of the batch index and the seed.

With ``--max-staleness K`` ≥ 1 the batches come from a producer thread that generates ahead from weights
up to K versions old (``training/async_rollout.py``); the behaviour policy is then the sample's own
version (``training/behaviour.py``). Weight version = rollout batches trained = ``batch_index``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_opd.platform import ParallelState, destroy_distributed, initialize_distributed
from megatron_opd.training.async_rollout import build_rollout_source, check_staleness, staleness_metrics
from megatron_opd.training.behaviour import WeightSnapshots, attach_behaviour_logprobs
from megatron_opd.training.behaviour import engine_logprob_gap as engine_logprob_gap  # re-exported
from megatron_opd.training.checkpoint import find_run_to_resume, load_run_checkpoint, save_run_checkpoint
from megatron_opd.training.components import Components, build_components
from megatron_opd.training.config import OPDConfig
from megatron_opd.training.metrics import MetricsLogger, derive_step_metrics
from megatron_opd.training.run_dir import prepare_run_dir
from megatron_opd.training.step import train_step
from megatron_opd.versions import check_versions


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row (--max-bad-steps)."""


def minibatch_plan(num_sequences: int, num_minibatches: int, epoch: int, batch_index: int, seed: int) -> list:
    """Index tensors of each minibatch of one epoch; epoch 0 keeps rollout order (the recompute
    layout), later epochs reshuffle with a seed derived from (seed, batch, epoch)."""
    order = torch.arange(num_sequences)
    if epoch > 0:
        gen = torch.Generator().manual_seed(seed * 7919 + batch_index * 131 + epoch)
        order = torch.randperm(num_sequences, generator=gen)
    return list(order.chunk(num_minibatches))


def train(cfg: OPDConfig) -> dict:
    """Run training; returns the last step's metrics. Every rank calls it (under torchrun)."""
    state = initialize_distributed(cfg.parallel)
    try:
        return run_training(cfg, state)
    finally:
        destroy_distributed()


def run_training(cfg: OPDConfig, state: ParallelState) -> dict:
    """The loop on an already initialised ``state`` (several runs can share one process group)."""
    if state.rank == 0:
        prepare_run_dir(cfg)  # the effective config, written before anything can fail
        check_versions()  # warns (does not stop) when installed versions differ from the pins
    run = build_components(cfg, state)
    step, batch_index, bad_in_a_row = _resume(cfg, run)
    obj, metrics = cfg.objective, {}
    steps_per_batch = obj.epochs_per_rollout * obj.minibatches_per_rollout
    rollouts = build_rollout_source(cfg, run, last_batch=-(-cfg.optim.train_iters // steps_per_batch) - 1)
    max_staleness = cfg.engines.max_staleness
    snapshots = (WeightSnapshots(run.student.model, keep=max_staleness + 1)
                 if max_staleness and obj.logprob_source == "recompute" else None)
    try:
        _publish(rollouts, snapshots, batch_index)  # the rollout engine starts from the trainer's weights
        log = MetricsLogger(cfg.log.run_dir, enabled=state.rank == 0, total_steps=cfg.optim.train_iters,
                            progress=cfg.log.progress, tensorboard=cfg.log.tensorboard,
                            wandb_project=cfg.log.wandb_project, config=cfg.to_dict(), start_step=step)
        log.set_position(step)
        while step < cfg.optim.train_iters:
            t0 = time.perf_counter()
            batch = rollouts.take(batch_index)  # trainer version = batch_index: batches trained so far
            exp, batch_metrics = batch.exp, batch.metrics
            plans = [minibatch_plan(exp.num_sequences, obj.minibatches_per_rollout, epoch, batch_index,
                                    cfg.optim.seed) for epoch in range(obj.epochs_per_rollout)]
            t1 = time.perf_counter()
            gap = {}
            if obj.objective != "sft":
                gap = attach_behaviour_logprobs(obj.logprob_source, run, exp, plans[0], state, cfg,
                                                trainer_version=batch_index, sample_version=batch.version,
                                                snapshots=snapshots)
            batch_metrics["time_recompute"] = time.perf_counter() - t1
            update = 0
            for plan in plans:
                for indices in plan:
                    if step >= cfg.optim.train_iters:
                        break
                    t_step = time.perf_counter()
                    minibatch = exp.select(indices)
                    ages = _staleness(minibatch, batch_index, max_staleness, step + 1)
                    sums = train_step(run.student, run.loss, minibatch, state, cfg.optim.micro_batch_size,
                                      REPORT_KEYS, cfg.optim.max_tokens_per_micro_batch)
                    metrics = derive_step_metrics(sums, run.loss.step_gate_scale)
                    bad_in_a_row = bad_in_a_row + 1 if metrics.get("skipped") else 0
                    if bad_in_a_row >= cfg.log.max_bad_steps:
                        raise NonFiniteLossError(f"{bad_in_a_row} non-finite losses in a row at step {step + 1} "
                                                 f"(--max-bad-steps {cfg.log.max_bad_steps}); lower --lr?")
                    step += 1
                    metrics.update(batch_index=batch_index, update_in_rollout=update,
                                   time_train=time.perf_counter() - t_step, **ages, **gap,
                                   **(batch_metrics if update == 0 else {}))
                    update += 1
                    log.log(step, metrics, summary=step % cfg.log.log_interval == 0)
            t_sync = time.perf_counter()
            batch_index += 1
            _publish(rollouts, snapshots, batch_index)
            log.log(step, {"time_sync": time.perf_counter() - t_sync, "time_iteration": time.perf_counter() - t0},
                    summary=False)
            _maybe_checkpoint(cfg, run, step, batch_index, bad_in_a_row, steps_this_batch=update)
            _maybe_evaluate(cfg, run, state, step, log, steps_this_batch=update)
            for target in cfg.checkpoint.export_hf_at:
                if step - update < target <= step:
                    _export_hf(run, state, Path(cfg.log.run_dir) / f"hf_step{target}", cfg.model.student_hf)
    except BaseException:
        rollouts.close(abandon=True)  # the producer may wait in a collective of ranks that are gone
        raise
    rollouts.close()
    if run.rollout_engine is not None:
        run.rollout_engine.close()  # e.g. ends the weight-update group of --weight-sync distributed
    _maybe_export_hf(cfg, run, state)
    log.close()
    return metrics


def _publish(rollouts, snapshots: WeightSnapshots | None, version: int) -> None:
    """Weight version ``version`` (= rollout batches trained) goes to the rollout side (a sync at K = 0)."""
    if snapshots is not None:
        snapshots.record(version)
    rollouts.publish(version)


def _staleness(minibatch, trainer_version: int, max_staleness: int, step: int) -> dict:
    """Asserts every sample of the step is at most --max-staleness versions old; its histogram as metrics."""
    if minibatch.weight_versions is None or (max_staleness == 0 and bool((minibatch.weight_versions < 0).any())):
        return {}  # SFT, or a synchronous engine that does not name its weights: nothing to bound
    ages = check_staleness(minibatch.weight_versions, trainer_version, max_staleness, where=f"step {step}")
    return staleness_metrics(ages, max_staleness)


REPORT_KEYS = ["tokens", "loss_sum", "entropy_sum", "gate_weighted", "abs_drift_sum", "abs_drift_max",
               "reverse_kl_sum", "clip_fraction_sum", "ratio_sum", "reward_sum", "teacher_topk_mass_sum",
               "student_topk_mass_sum", "sampled_outside_topk_sum", "topk_overlap_sum",
               "gate_min", "gate_max", "gate_sq_sum", "gate_below_half_sum"]


def _resume(cfg: OPDConfig, run: Components) -> tuple[int, int, int]:
    """(step, batch index, bad steps in a row) to start from.

    A restarted job resumes from its own --save directory first (Megatron's convention), then from a
    run checkpoint under --load; a --load without one (e.g. from tools/convert_hf_to_megatron.py)
    gives the starting weights only, loaded by ``build_student`` before the optimizer exists.
    """
    path = find_run_to_resume(cfg.checkpoint.save, cfg.checkpoint.load)
    if path is None:
        return 0, 0, 0
    trainer_state = load_run_checkpoint(path, run.student)
    return trainer_state["step"], trainer_state["batch_index"], trainer_state["bad_in_a_row"]


def _maybe_checkpoint(cfg: OPDConfig, run: Components, step: int, batch_index: int, bad: int,
                      steps_this_batch: int) -> None:
    """Save at the end, and at the rollout boundary where the step count crosses a --save-interval multiple."""
    ckpt = cfg.checkpoint
    if not ckpt.save:
        return
    interval = ckpt.save_interval
    crossed = interval and step // interval != (step - steps_this_batch) // interval
    if step >= cfg.optim.train_iters or crossed:
        save_run_checkpoint(ckpt.save, step, run.student,
                            {"step": step, "batch_index": batch_index, "bad_in_a_row": bad}, ckpt.keep_last)


def _maybe_evaluate(cfg: OPDConfig, run: Components, state: ParallelState, step: int, log: MetricsLogger,
                    steps_this_batch: int) -> None:
    """Every --eval-interval steps (at rollout boundaries): pass@k of the synced rollout engine, rank 0."""
    interval = cfg.log.eval_interval
    if not interval or run.rollout_engine is None or step // interval == (step - steps_this_batch) // interval:
        return
    if state.rank == 0:
        from megatron_opd.eval.harness import evaluate

        n = cfg.log.eval_n
        results = evaluate(run.rollout_engine, run.tokenizer, benchmarks=cfg.log.eval_benchmarks, n=n, ks=(1, n),
                           out_dir=str(Path(cfg.log.run_dir) / "eval" / f"step{step:07d}"), show_progress=False,
                           max_new_tokens=cfg.engines.max_new_tokens)
        mean = results["mean"]["metrics"]
        log.log(step, {f"eval_{k}": v["value"] for k, v in mean.items()}, summary=True)
    torch.distributed.barrier()  # collective: the other ranks wait for rank 0's evaluation


def _maybe_export_hf(cfg: OPDConfig, run: Components, state: ParallelState) -> None:
    if cfg.checkpoint.save_hf:
        _export_hf(run, state, Path(cfg.checkpoint.save_hf), cfg.model.student_hf)


def _export_hf(run: Components, state: ParallelState, out_dir: Path, hf_config_dir: str) -> None:
    """Collective: gather the full HF weights; rank 0 writes them (atomically) with config + tokenizer."""
    from megatron_opd.models import gather_hf_state_dict, write_hf_checkpoint

    state_dict = gather_hf_state_dict(run.student.unwrapped(), run.student.hf_config)
    if state.rank == 0:
        write_hf_checkpoint(out_dir, state_dict, hf_config_dir, overwrite=True)
