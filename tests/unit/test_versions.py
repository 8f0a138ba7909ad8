"""Pinned versions and the start-up check (megatron_opd.versions)."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd import versions

REPO = Path(__file__).resolve().parents[2]
# What NGC 25.11 holds (torch 2.10.0a0+b558c986e8, TE 2.9.0+70f53666, CUDA 13.0) + the SGLang pins.
ALL_OK = {"torch": "2.10.0a0+b558c986e8", "megatron-core": "0.16.1", "transformer-engine": "2.9.0+70f53666",
          "sglang": "0.5.23", "sglang-router": "0.3.2", "cuda": "13.0"}


@pytest.mark.parametrize("pinned, installed, expected", [
    ("2.13.0", "2.13.0+cpu", True),
    ("2.13.0", "2.13.0a0+git1234abc", True),   # NVIDIA container builds
    ("2.13.0", "2.13.1", False),
    ("2.13.0", "2.1.30", False),                # no string-prefix false positive
    ("2.8", "2.8.1+abc", True),
    ("2.8", "2.80.0", False),
    ("2.8", "2.9.0", False),
    ("12.9", "12.9", True),
    ("12.9", "12.8", False),
])
def test_version_matches(pinned, installed, expected):
    assert versions.version_matches(pinned, installed) is expected


def test_release_tuple_rejects_garbage():
    with pytest.raises(ValueError, match="'unknown'"):
        versions.release_tuple("unknown")


def test_all_matching_gives_no_warning():
    assert versions.check_versions(installed=ALL_OK, gpu=True, log=lambda _: None) == []


def test_mismatch_names_component_both_versions_and_pin_file():
    logged = []
    warnings = versions.check_versions(installed={**ALL_OK, "megatron-core": "0.15.0"}, gpu=True,
                                       log=logged.append)
    assert len(warnings) == 1 and len(logged) == 1
    assert "megatron-core 0.15.0" in warnings[0] and "0.16.1" in warnings[0]
    assert "megatron_opd/versions.py" in warnings[0]
    assert "WARNING" in logged[0]


def test_strict_raises_with_every_problem():
    bad = {**ALL_OK, "torch": "2.12.0", "transformer-engine": None}
    with pytest.raises(RuntimeError) as info:
        versions.check_versions(strict=True, installed=bad, gpu=True)
    assert "torch 2.12.0" in str(info.value) and "transformer-engine 2.9 is pinned but not installed" in str(info.value)


def test_gpu_only_components_may_be_absent_on_cpu_but_not_on_gpu():
    cpu_env = {**ALL_OK, "torch": "2.13.0+cpu", "transformer-engine": None, "cuda": None, "sglang": None,
               "sglang-router": None}
    assert versions.check_versions(installed=cpu_env, gpu=False, log=lambda _: None) == []
    on_gpu = versions.check_versions(installed={**cpu_env, "torch": ALL_OK["torch"]}, gpu=True, log=lambda _: None)
    assert sorted(w.split()[0] for w in on_gpu) == ["cuda", "transformer-engine"]


def test_sglang_lives_in_its_own_env_but_a_wrong_installed_one_warns():
    assert versions.check_versions(installed={**ALL_OK, "sglang": None}, gpu=True, log=lambda _: None) == []
    warnings = versions.check_versions(installed={**ALL_OK, "sglang": "0.4.9"}, gpu=True, log=lambda _: None)
    assert warnings and "sglang 0.4.9" in warnings[0]


def test_server_reported_sglang_version_is_checked_per_url():
    servers = {"http://node1:30001": "0.5.23", "http://node1:30002": "0.5.9"}
    warnings = versions.check_versions(installed=ALL_OK, gpu=True, sglang_server_versions=servers,
                                       log=lambda _: None)
    assert len(warnings) == 1 and "http://node1:30002" in warnings[0] and "0.5.9" in warnings[0]


def test_reads_this_environment():
    found = versions.installed_versions()
    assert found["torch"] == importlib.metadata.version("torch")
    assert found["megatron-core"] == importlib.metadata.version("megatron-core")


def test_shell_output_matches_pins_and_cli_runs():
    result = subprocess.run([sys.executable, "-m", "megatron_opd.versions", "--shell"],
                            capture_output=True, text=True, check=True)
    pairs = dict(line.split("=", 1) for line in result.stdout.split())
    assert pairs["TORCH_VERSION"] == versions.TORCH and pairs["SGLANG_VERSION"] == versions.SGLANG
    table = subprocess.run([sys.executable, "-m", "megatron_opd.versions"], capture_output=True, text=True)
    assert table.returncode == 0 and re.search(r"torch\s+2\.13\.0", table.stdout)  # CPU env: the CPU pin


def test_pyproject_sglang_extra_agrees_with_the_pin():
    text = (REPO / "pyproject.toml").read_text()
    assert f'"sglang=={versions.SGLANG}"' in text, "pyproject.toml's sglang extra disagrees with versions.SGLANG"


def test_torch_pin_follows_the_platform():
    """GPU machines are held to the NGC image's torch, CPU machines to scripts/setup_env.sh's."""
    assert versions.pinned_version("torch", gpu=True) == versions.TORCH == "2.10"
    assert versions.pinned_version("torch", gpu=False) == versions.TORCH_CPU
    setup = (REPO / "scripts" / "setup_env.sh").read_text()
    assert f"TORCH_VERSION:-{versions.TORCH_CPU}" in setup
    # a CPU torch on a GPU image is a mismatch, and the image's torch on a CPU machine is one too
    assert versions.check_versions(installed={**ALL_OK, "torch": "2.13.0+cpu"}, gpu=True, log=lambda _: None)
    cpu = {**ALL_OK, "transformer-engine": None, "cuda": None}
    assert any("torch 2.10.0a0" in w for w in versions.check_versions(installed=cpu, gpu=False, log=lambda _: None))


def test_gpu_flag_holds_a_cpu_environment_to_the_gpu_pins():
    """`docker build` sees no GPU: `--strict --gpu` must still demand TE and CUDA (here: absent, so exit 1)."""
    result = subprocess.run([sys.executable, "-m", "megatron_opd.versions", "--strict", "--gpu"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "transformer-engine 2.9 is pinned but not installed" in result.stderr
    assert "cuda 13.0 is pinned but not installed" in result.stderr


def test_te_pin_is_within_the_installed_megatron_cores_range():
    """megatron-core 0.16.1 declares transformer-engine>=2.9.0a0,<2.12.0 (read from its metadata)."""
    specifier = versions.megatron_core_te_requirement()
    assert specifier is not None, "installed megatron-core declares no transformer-engine requirement"
    assert importlib.metadata.version("megatron-core") == versions.MEGATRON_CORE
    assert versions.te_allowed_by_megatron_core(versions.TRANSFORMER_ENGINE, specifier), specifier
    assert versions.te_allowed_by_megatron_core(ALL_OK["transformer-engine"], specifier)
    assert not versions.te_allowed_by_megatron_core("2.8", specifier)   # the old pin
    assert not versions.te_allowed_by_megatron_core("2.12.0", specifier)
    ok = versions.check_versions(installed=ALL_OK, gpu=True, te_specifier=specifier, log=lambda _: None)
    assert ok == []
    old = versions.check_versions(installed={**ALL_OK, "transformer-engine": "2.8.0"}, gpu=True,
                                  te_specifier=specifier, log=lambda _: None)
    assert any("outside megatron-core's transformer-engine" in w for w in old)


def test_this_environment_has_no_te_range_problem():
    checks = {c.name: c for c in versions.collect_checks()}
    assert checks["te-vs-megatron-core"].status == "ok", checks["te-vs-megatron-core"].message


def test_gpu_pins_are_one_cuda_13_stack():
    """NGC 25.11 is CUDA 13.0; SGLang 0.5.23's kernels are CUDA 13 builds: one CUDA major, one driver branch."""
    assert versions.release_tuple(versions.CUDA)[0] == 13
    assert versions.NGC_PYTORCH == "25.11"
    assert versions.release_tuple(versions.SGLANG) == (0, 5, 23)


def test_pyproject_gpu_extra_allows_the_te_pin():
    import tomllib
    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    te = next(Requirement(r) for r in extras["gpu"] if Requirement(r).name == "transformer-engine")
    assert te.specifier.contains(versions.TRANSFORMER_ENGINE + ".0", prereleases=True), te
    router = next(Requirement(r) for r in extras["sglang"] if Requirement(r).name == "sglang-router")
    assert str(router.specifier) == f"=={versions.SGLANG_ROUTER}"
