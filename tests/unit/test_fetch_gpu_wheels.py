"""scripts/fetch_gpu_wheels.sh fetches exactly what the GPU image lacks: every project dependency, and every
dependency of a fetched package, is either fetched or brought by the image (its IMAGE_HAS list). A new
dependency added to pyproject.toml without a wheel fails here, not in a GPU session without network."""

import importlib.metadata
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch_gpu_wheels.sh"


GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _needed_on_the_gpu(requirement: str) -> bool:
    marker = Requirement(requirement).marker
    return marker is None or marker.evaluate(GPU_PYTHON)


def _bash_array(name: str) -> list[str]:
    body = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.S | re.M).group(1)
    return [word for line in body.splitlines() for word in line.split("#")[0].split()]


def test_every_dependency_is_fetched_or_in_the_image():
    fetched = {_name(w): w.split("==")[1] for w in _bash_array("WHEELS")}
    image = {_name(w) for w in _bash_array("IMAGE_HAS")}
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", w) for w in _bash_array("WHEELS")), "pin every fetched wheel"
    known = set(fetched) | image
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {_name(d) for d in deps if _needed_on_the_gpu(d)} - known
    assert not missing, f"project dependencies neither fetched nor in the GPU image: {sorted(missing)}"
    for package in fetched:
        requires = importlib.metadata.requires(package) or []
        needed = {_name(r) for r in requires if _needed_on_the_gpu(r)}
        assert needed <= known, f"{package} needs {sorted(needed - known)}: fetch them or list them in IMAGE_HAS"
