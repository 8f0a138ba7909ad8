"""Pinned versions and the start-up check (megatron_opd.versions)."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd import versions

REPO = Path(__file__).resolve().parents[2]
ALL_OK = {"torch": "2.13.0+cu129", "megatron-core": "0.16.1", "transformer-engine": "2.8.0",
          "sglang": "0.5.6", "sglang-router": "0.3.2", "cuda": "12.9"}


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
    assert "torch 2.12.0" in str(info.value) and "transformer-engine 2.8 is pinned but not installed" in str(info.value)


def test_gpu_only_components_may_be_absent_on_cpu_but_not_on_gpu():
    cpu_env = {**ALL_OK, "transformer-engine": None, "cuda": None, "sglang": None, "sglang-router": None}
    assert versions.check_versions(installed=cpu_env, gpu=False, log=lambda _: None) == []
    on_gpu = versions.check_versions(installed=cpu_env, gpu=True, log=lambda _: None)
    assert sorted(w.split()[0] for w in on_gpu) == ["cuda", "transformer-engine"]


def test_sglang_lives_in_its_own_env_but_a_wrong_installed_one_warns():
    assert versions.check_versions(installed={**ALL_OK, "sglang": None}, gpu=True, log=lambda _: None) == []
    warnings = versions.check_versions(installed={**ALL_OK, "sglang": "0.4.9"}, gpu=True, log=lambda _: None)
    assert warnings and "sglang 0.4.9" in warnings[0]


def test_server_reported_sglang_version_is_checked_per_url():
    servers = {"http://node1:30001": "0.5.6", "http://node1:30002": "0.5.9"}
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
    assert table.returncode == 0 and re.search(r"torch\s+2\.13\.0", table.stdout)


def test_pyproject_sglang_extra_agrees_with_the_pin():
    text = (REPO / "pyproject.toml").read_text()
    assert f'"sglang=={versions.SGLANG}"' in text, "pyproject.toml's sglang extra disagrees with versions.SGLANG"
