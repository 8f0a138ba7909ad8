"""Run several short trainings in one torchrun job (process start-up costs more than the runs).

usage: torchrun --nproc-per-node N trainer_matrix.py WORKDIR NAME=FLAGS_JSON [NAME=FLAGS_JSON ...]
Each run writes WORKDIR/NAME/metrics.jsonl.
"""

import json
import sys
from pathlib import Path


def main() -> None:
    from megatron_opd.platform import destroy_distributed, initialize_distributed
    from megatron_opd.recipes.common import flags_to_argv
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.loop import run_training

    workdir = Path(sys.argv[1])
    runs = [arg.split("=", 1) for arg in sys.argv[2:]]
    configs = []
    for name, flags_json in runs:
        flags = json.loads(flags_json)
        argv = flags_to_argv(flags) + ["--run-dir", str(workdir / name), "--no-progress"]
        configs.append(parse_config(argv))
    state = initialize_distributed(configs[0].parallel)
    try:
        for cfg in configs:
            run_training(cfg, state)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
