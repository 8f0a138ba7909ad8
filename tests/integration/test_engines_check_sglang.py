"""tools/check_sglang.py passes against the contract server and reports a broken one."""

import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))
import check_sglang  # noqa: E402
from contract_server import single_thread_torch, start_contract_server  # noqa: E402
from sglang_contract.tiny import tiny_qwen3  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with single_thread_torch():
        yield


@pytest.fixture(scope="module")
def server():
    srv = start_contract_server(copy.deepcopy(tiny_qwen3(seed=0)))
    yield srv
    srv.close()


def test_contract_server_passes_every_check(server, tmp_path, capsys):
    tiny_qwen3(seed=3).save_pretrained(tmp_path)
    code = check_sglang.main(["--url", server.url, "--prompt-ids", "5,6,7,8", "--tol", "1e-5",
                              "--weights-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("PASS") == 9 and "FAIL" not in out


def test_broken_server_fails(server, capsys):
    server.inject("nan_logprob", 1000)
    try:
        code = check_sglang.main(["--url", server.url, "--prompt-ids", "5,6,7,8"])
    finally:
        server.faults["nan_logprob"] = 0
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  greedy determinism" in out and "not a finite log-prob" in out
