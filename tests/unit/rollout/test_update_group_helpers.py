"""Sizing and addressing the weight-update group of ``--weight-sync distributed``."""

import socket

import pytest

from megatron_opd.rollout.sglang_http import SGLangError
from megatron_opd.rollout.sglang_weights import free_port_on, local_address_towards, worker_tp_size


def test_local_address_is_the_source_address_towards_the_worker():
    assert local_address_towards("http://127.0.0.1:30000") == "127.0.0.1"
    assert local_address_towards("http://127.0.0.1") == "127.0.0.1"  # no port: the scheme's


def test_free_port_can_be_bound_on_that_address():
    port = free_port_on("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("info", [None, {}, {"tp_size": 0}, {"tp_size": "2"}])
def test_a_worker_without_a_tp_size_is_named(info):
    with pytest.raises(SGLangError, match="http://w:1.*tp_size"):
        worker_tp_size(info, "http://w:1")


def test_tp_size_counts_the_workers_ranks():
    assert worker_tp_size({"tp_size": 4}, "http://w:1") == 4
