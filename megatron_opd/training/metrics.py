"""Run observability: ``metrics.jsonl`` (one JSON line per step), a one-line summary, a tqdm
progress bar with ETA, and TensorBoard / W&B when installed and asked for. Rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("loss", "reverse_kl", "gate_mean", "gate_min", "abs_drift_mean", "entropy", "response_length",
                "grad_norm", "lr")


def derive_step_metrics(sums: dict[str, float], gate_scale: float) -> dict[str, float]:
    """Turn reduced report sums into the per-step metrics of DESIGN §2.6."""
    tokens = max(sums.get("tokens", 0.0), 1.0)
    out = {"tokens": sums.get("tokens", 0.0)}
    weighted = sums.get("gate_weighted", tokens)
    # Σ m g ℓ / Σ m times the step's gate scale (Σ m / Σ m g for the exact mean normalisation, 1 for
    # the others): the loss that was trained.
    out["loss"] = sums.get("loss_sum", 0.0) / tokens * gate_scale
    out["entropy"] = sums.get("entropy_sum", 0.0) / tokens
    for key, value in sums.items():
        if key.endswith("_sum") and key not in ("loss_sum", "entropy_sum", "gate_sq_sum", "gate_below_half_sum"):
            out[key[: -len("_sum")] if not key.startswith("abs_drift") else "abs_drift_mean"] = value / tokens
        elif key.endswith(("_max", "_min")) or key.startswith("moe_") or key in ("grad_norm", "lr", "skipped",
                                                                                "padding_fraction"):
            out[key] = value
    if "gate_sq_sum" in sums:
        # Normalised gates ĝ = g · scale (scale = Σm / Σmg): mean 1 by construction.
        mean = weighted / tokens * gate_scale
        second = sums["gate_sq_sum"] / tokens * gate_scale**2
        out.update(gate_mean=mean, gate_std=math.sqrt(max(second - mean * mean, 0.0)),
                   gate_min=sums["gate_min"] * gate_scale, gate_max=sums["gate_max"] * gate_scale,
                   gate_raw_below_half=sums["gate_below_half_sum"] / tokens)
    return out


def drop_metrics_after(path: Path, step: int) -> int:
    """Keep only the lines of ``path`` (metrics.jsonl) whose step is <= ``step``; returns how many were dropped.

    A run killed after its last checkpoint logged steps that the resumed run logs again; without this
    those steps would appear twice. The file is rewritten atomically (temp file, fsync, rename), so a
    crash here leaves either the old or the new file. A line that does not parse can only be the last
    one, cut short by the kill; it is dropped too.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s line %d: not a metrics record (cut short by a crash?); dropped", path, number)
            dropped += 1
            continue
        if record_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    return dropped


class MetricsLogger:
    """``start_step`` is the step the run starts from (the resumed checkpoint's, or 0): lines a killed
    earlier run logged past it are dropped from metrics.jsonl, so every step appears once."""

    def __init__(self, run_dir: str, *, enabled: bool, total_steps: int, progress: bool,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None,
                 start_step: int = 0):
        self.enabled = enabled
        self.start = time.time()
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        drop_metrics_after(self.dir / "metrics.jsonl", start_step)
        self.file = (self.dir / "metrics.jsonl").open("a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="opd", unit="step", dynamic_ncols=True)
        if tensorboard:
            self.tb = _maybe_tensorboard(self.dir, start_step)
        if wandb_project:
            self.wandb = _maybe_wandb(wandb_project, config)

    def set_position(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, step: int, metrics: dict, summary: bool) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        line = " ".join(f"{k}={metrics[k]:.4g}" for k in SUMMARY_KEYS if k in metrics)
        if self.bar is not None:
            self.bar.update(max(step - self.bar.n, 0))
            if summary:
                self.bar.write(f"step {step}: {line}")
        elif summary:
            print(f"step {step}: {line}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _maybe_tensorboard(run_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("--tensorboard: tensorboard is not installed (pip install tensorboard); not logging there")
        return None
    # purge_step: TensorBoard hides the events a killed earlier run wrote past the resumed step.
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)


def _maybe_wandb(project: str, config: dict | None):
    try:
        import wandb
    except ImportError:
        print("--wandb-project: wandb is not installed (pip install wandb); not logging there")
        return None
    return wandb.init(project=project, config=config)
