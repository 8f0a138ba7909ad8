"""The one place where the versions this project was built and checked against are pinned.

The trainer compares what is installed with these at start-up and warns on a mismatch
(``check_versions``); the Docker image and the launch scripts read the same values
(``python -m megatron_opd.versions --shell`` prints them as shell assignments, and a test
checks that ``docker/Dockerfile``'s ``ARG`` defaults agree with them).

The GPU pins are the contents of ONE NGC PyTorch image, ``nvcr.io/nvidia/pytorch:25.11-py3``:
torch ``2.10.0a0+b558c986e8`` (an NVIDIA pre-release build of 2.10), CUDA 13.0 (13.0.2),
Transformer Engine 2.9.0. Why that tag: megatron-core 0.16.1 declares
``transformer-engine>=2.9.0a0,<2.12.0`` (its ``dev`` extra) and its CI builds its ``dev`` image on
NGC 25.11 (``docker/.ngc_version.dev`` at tag core_v0.16.1; 25.09 is its ``lts`` image, whose TE
is older than 2.9). The build runs ``python -m megatron_opd.versions --strict`` inside the image, so
a tag whose contents differ from these pins fails the build instead of shipping.

CPU machines (development, CI) use the PyPI CPU build of torch pinned in ``scripts/setup_env.sh``
(``TORCH_CPU``); which torch pin applies is decided by whether CUDA is available.

Matching rule: a pin matches an installed version when the pin's release numbers are a prefix
of the installed release numbers, so ``2.10`` matches NVIDIA's ``2.10.0a0+gitXXXX`` builds and
``2.13.0`` matches ``2.13.0+cpu``, and ``2.9`` matches TE ``2.9.0``/``2.9.1``.

SGLang 0.5.23 pins ``torch==2.14.1`` and ``transformers==5.19.0`` (its wheel METADATA) and its GPU
kernels are CUDA 13 builds (``sglang-kernel==0.4.10``, ``flashinfer_python[cu13]==0.7.2``,
``cuda-python>=13``): the same CUDA major and driver branch as the NGC image, but a torch that
cannot share an environment with the trainer's. The Docker image installs SGLang into its own
virtual environment (``/opt/sglang``), so an SGLang missing from the trainer's environment is
normal; the server's version (``/get_server_info`` → ``version``) can be passed in instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

NGC_PYTORCH = "25.11"
"""Release of the NGC PyTorch base image (``nvcr.io/nvidia/pytorch:25.11-py3``) the GPU pins describe."""
TORCH = "2.10"
"""torch in the NGC image (GPU machines)."""
TORCH_CPU = "2.13.0"
"""torch on CPU machines (``scripts/setup_env.sh`` installs this PyPI CPU build)."""
MEGATRON_CORE = "0.16.1"
TRANSFORMER_ENGINE = "2.9"
SGLANG = "0.5.23"
SGLANG_ROUTER = "0.3.2"
CUDA = "13.0"

#: component name -> pinned version; the names are the keys of ``installed_versions()``.
PINS: dict[str, str] = {
    "torch": TORCH,
    "megatron-core": MEGATRON_CORE,
    "transformer-engine": TRANSFORMER_ENGINE,
    "sglang": SGLANG,
    "sglang-router": SGLANG_ROUTER,
    "cuda": CUDA,
}

#: components that only exist on GPU machines (absent on CPU: not a problem there).
GPU_ONLY = frozenset({"transformer-engine", "cuda"})
#: components that normally live in the SGLang servers' own environment, not the trainer's.
SERVER_SIDE = frozenset({"sglang", "sglang-router"})

# Distribution names to try for each component (TE ships under several names).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch"),
    "sglang": ("sglang",),
    "sglang-router": ("sglang-router", "sglang_router"),
}

#: statuses that are warned about.
PROBLEMS = frozenset({"mismatch", "missing"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionCheck:
    """The outcome for one component.

    ``status``: ``ok``; ``absent`` (not installed, and not needed here); ``mismatch`` or
    ``missing`` (both are problems the trainer warns about).
    """

    name: str
    pinned: str
    installed: str | None
    status: str
    message: str


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading release numbers of a version string: ``"2.13.0a0+git1"`` -> ``(2, 13, 0)``."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def version_matches(pinned: str, installed: str) -> bool:
    """True when the pin's release numbers are a prefix of the installed ones (see module doc)."""
    pin = release_tuple(pinned)
    return release_tuple(installed)[: len(pin)] == pin


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cuda_version() -> str | None:
    """CUDA version torch was built with; None for a CPU build or without torch."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def installed_versions() -> dict[str, str | None]:
    """Versions installed in this environment (None = not installed / not a CUDA build)."""
    found: dict[str, str | None] = {name: _distribution_version(dists) for name, dists in _DISTRIBUTIONS.items()}
    found["cuda"] = _cuda_version()
    return found


def _gpu_environment() -> bool:
    """A CUDA build of torch (or a visible GPU): the GPU pins apply.

    Decided by the build, not by a visible GPU: ``docker build`` runs without GPUs, and its
    ``--strict`` check must still hold the image to the GPU pins.
    """
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None or torch.cuda.is_available()  # host-device query, once


def pinned_version(name: str, gpu: bool) -> str:
    """The pin of ``name`` on a GPU machine (``gpu=True``: the NGC image) or a CPU one."""
    return TORCH_CPU if name == "torch" and not gpu else PINS[name]


def _check_one(name: str, installed: str | None, gpu: bool) -> VersionCheck:
    pinned = pinned_version(name, gpu)
    if installed is None:
        expected_absent = name in SERVER_SIDE or (name in GPU_ONLY and not gpu)
        status = "absent" if expected_absent else "missing"
        where = "the SGLang servers' environment" if name in SERVER_SIDE else "this GPU environment"
        message = (f"{name} is not installed here (expected: it belongs in {where})" if expected_absent
                   else f"{name} {pinned} is pinned but not installed; install it (see docker/Dockerfile)")
        return VersionCheck(name, pinned, None, status, message)
    if version_matches(pinned, installed):
        return VersionCheck(name, pinned, installed, "ok", f"{name} {installed} matches the pin {pinned}")
    message = (f"{name} {installed} is installed but megatron-opd pins {pinned} "
               f"(megatron_opd/versions.py); results may differ from the tested set-up")
    return VersionCheck(name, pinned, installed, "mismatch", message)


def megatron_core_te_requirement() -> str | None:
    """The ``transformer-engine`` specifier the installed megatron-core declares (its ``dev`` extra).

    None when megatron-core is not installed or declares none. Read from the package metadata, so
    the check follows whatever megatron-core is really installed.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requirements = importlib.metadata.requires("megatron-core") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requirements:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "transformer-engine" and requirement.specifier:
            return str(requirement.specifier)
    return None


def te_allowed_by_megatron_core(te_version: str, specifier: str) -> bool:
    """Whether TE ``te_version`` (a pin like ``2.9`` or an installed ``2.9.0+70f53666``) is in range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    release = ".".join(map(str, release_tuple(te_version)))  # local/pre-release tags do not change the range
    return SpecifierSet(specifier).contains(Version(release), prereleases=True)


def _te_range_check(installed_te: str | None, specifier: str | None) -> VersionCheck | None:
    if specifier is None:
        return None
    version = installed_te or TRANSFORMER_ENGINE
    what = f"installed transformer-engine {installed_te}" if installed_te else f"the TE pin {TRANSFORMER_ENGINE}"
    if te_allowed_by_megatron_core(version, specifier):
        return VersionCheck("te-vs-megatron-core", specifier, version, "ok",
                            f"{what} is within megatron-core's transformer-engine{specifier}")
    return VersionCheck("te-vs-megatron-core", specifier, version, "mismatch",
                        f"{what} is outside megatron-core's transformer-engine{specifier}; pick an NGC "
                        f"tag whose TE is in range (megatron_opd/versions.py)")


def collect_checks(installed: Mapping[str, str | None] | None = None, gpu: bool | None = None,
                   sglang_server_versions: Mapping[str, str] | None = None,
                   te_specifier: str | None = None) -> list[VersionCheck]:
    """One ``VersionCheck`` per pinned component (and per SGLang server given).

    ``installed`` overrides what is read from this environment (component -> version or None);
    ``gpu`` says whether the GPU pins apply and GPU-only components must be present (default:
    torch is a CUDA build or sees a GPU);
    ``sglang_server_versions`` maps a server URL to the version its ``/get_server_info`` reports;
    ``te_specifier`` stands in for megatron-core's TE range when ``installed`` is given (otherwise
    the range is read from the installed megatron-core).
    """
    found = installed_versions() if installed is None else dict(installed)
    gpu = _gpu_environment() if gpu is None else gpu
    checks = [_check_one(name, found.get(name), gpu) for name in PINS]
    te_range = _te_range_check(found.get("transformer-engine"), te_specifier if installed is not None
                               else megatron_core_te_requirement())
    if te_range is not None:
        checks.append(te_range)
    for url, version in (sglang_server_versions or {}).items():
        check = _check_one("sglang", version, gpu)
        checks.append(VersionCheck(f"sglang@{url}", check.pinned, version, check.status,
                                   f"server {url}: {check.message}"))
    return checks


def check_versions(strict: bool = False, *, installed: Mapping[str, str | None] | None = None,
                   gpu: bool | None = None, sglang_server_versions: Mapping[str, str] | None = None,
                   te_specifier: str | None = None, log: Callable[[str], None] | None = None) -> list[str]:
    """Compare installed versions with the pins; return (and log) one warning per problem.

    Called by the trainer at start-up. A mismatch or a missing required component gives a
    warning naming the component, both versions and where the pin lives; ``strict=True`` raises
    ``RuntimeError`` with all of them instead. Arguments as in ``collect_checks``.
    """
    checks = collect_checks(installed, gpu, sglang_server_versions, te_specifier)
    warnings = [check.message for check in checks if check.status in PROBLEMS]
    if strict and warnings:
        raise RuntimeError("version check failed (strict):\n  " + "\n  ".join(warnings))
    emit = log or logger.warning
    for warning in warnings:
        emit(f"[megatron-opd versions] WARNING: {warning}")
    return warnings


def shell_assignments() -> str:
    """The pins as ``NAME=value`` lines for shell scripts (``eval "$(python -m ... --shell)"``)."""
    names = {"torch": "TORCH_VERSION", "megatron-core": "MEGATRON_CORE_VERSION",
             "transformer-engine": "TE_VERSION", "sglang": "SGLANG_VERSION",
             "sglang-router": "SGLANG_ROUTER_VERSION", "cuda": "CUDA_VERSION"}
    lines = [f"NGC_TAG={NGC_PYTORCH}-py3"] + [f"{names[name]}={PINS[name]}" for name in PINS]
    return "\n".join(lines + [f"TORCH_CPU_VERSION={TORCH_CPU}"])


def _format_table(checks: list[VersionCheck]) -> str:
    rows = [f"{'component':<20} {'pinned':<18} {'installed':<26} status"]
    rows += [f"{c.name:<20} {c.pinned:<18} {c.installed or '-':<26} {c.status}" for c in checks]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_opd.versions [--shell] [--strict]``: print pins or the check table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shell", action="store_true", help="print the pins as NAME=value lines")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any mismatch or missing component")
    parser.add_argument("--gpu", action="store_true",
                        help="hold this environment to the GPU pins (the NGC image) whatever torch build it has")
    args = parser.parse_args(argv)
    if args.shell:
        print(shell_assignments())
        return 0
    checks = collect_checks(gpu=True if args.gpu else None)
    print(_format_table(checks))
    problems = [c.message for c in checks if c.status in PROBLEMS]
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    return 1 if (args.strict and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
