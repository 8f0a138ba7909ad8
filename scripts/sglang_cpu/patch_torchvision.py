"""Make the registry's torchvision importable on CPU torch (run by ``scripts/setup_sglang_env.sh``).

torchvision 0.28.0 on the registry is built against CUDA torch: its ``_C`` extension does not load on
the CPU build of torch 2.13.0, so its operators (``torchvision::nms`` …) never get registered, and
``torchvision/_meta_registrations.py`` then fails at import with "operator torchvision::nms does not
exist". Most of that file already skips its registrations when the extension is missing; the
``torch.library.register_fake`` ones do not. This patch routes them through the same check. SGLang
imports only ``torchvision.transforms``, which needs none of these operators.

Usage: python patch_torchvision.py   (with the environment's python; idempotent)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARKER = "_register_fake_if_ops"
ANCHOR = "import torchvision.extension  # noqa: F401\n"
HELPER = '''

def _register_fake_if_ops(qualname):
    # megatron-opd CPU patch (scripts/sglang_cpu/patch_torchvision.py): without the C extension the
    # operator does not exist, so there is nothing to register a fake kernel for.
    if torchvision.extension._has_ops():
        return torch.library.register_fake(qualname)
    return lambda fn: fn
'''


def patch(path: Path) -> bool:
    """Patch ``_meta_registrations.py`` in place; False when it was already patched."""
    source = path.read_text()
    if MARKER in source:
        return False
    if ANCHOR not in source or "@torch.library.register_fake(" not in source:
        raise SystemExit(f"{path}: unexpected torchvision source (anchor or register_fake missing); "
                         "update scripts/sglang_cpu/patch_torchvision.py for this torchvision version")
    source = source.replace(ANCHOR, ANCHOR + HELPER, 1).replace("@torch.library.register_fake(", f"@{MARKER}(")
    path.write_text(source)
    return True


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit(f"torchvision is not installed for {sys.executable}")
    path = Path(spec.origin).parent / "_meta_registrations.py"
    print(f"{'patched' if patch(path) else 'already patched'}: {path}")


if __name__ == "__main__":
    main()
