"""The run directory: created before training, holds the effective config and the metrics."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.training.config import OPDConfig


def prepare_run_dir(cfg: OPDConfig) -> Path:
    """Create --run-dir and write the effective ``config.json`` (call on rank 0)."""
    run_dir = Path(cfg.log.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.write(run_dir / "config.json")
    return run_dir
