"""The one place where the versions this project was built and checked against are pinned.

The trainer compares what is installed with these at start-up and warns on a mismatch
(see ``check_versions``); the Docker image and the launch scripts read the same values.
"""

TORCH = "2.13.0"
MEGATRON_CORE = "0.16.1"
TRANSFORMER_ENGINE = "2.8"
SGLANG = "0.5.6"
CUDA = "12.9"
