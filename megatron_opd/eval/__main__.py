"""``python -m megatron_opd.eval``: see ``megatron_opd.eval.cli``."""

import sys

from megatron_opd.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
