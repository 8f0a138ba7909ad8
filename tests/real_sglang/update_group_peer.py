"""One member of an SGLang weight-update group, run as its own process by test_distributed_update_group.py.

``trainer SPEC``: the project's side (its venv): ``trainer_update_group`` + ``broadcast_named_tensors``.
``sglang SPEC RANK_OFFSET OUT``: SGLang's side, run by the real-SGLang environment's python. It calls
the methods a real server's model runner calls for ``/init_weights_update_group`` and
``/update_weights_from_distributed`` (``WeightUpdater.init_weights_update_group``, which goes through
``init_custom_process_group``, and ``receive_weights_from_distributed``), imported from the sglang
package, and saves what it received.
"""

import json
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch


def trainer(spec: dict) -> None:
    from megatron_opd.rollout.sglang_weights import broadcast_named_tensors, trainer_update_group

    named = torch.load(spec["tensors"])
    group = trainer_update_group(spec["address"], spec["port"], spec["world_size"], spec["group_name"], "gloo",
                                 timeout=timedelta(seconds=spec["timeout_s"]))
    broadcast_named_tensors(named, group)
    torch.distributed.barrier(group=group)  # collective: every worker has its tensors before we exit
    print("trainer: sent", len(named), "tensors", flush=True)


def sglang(spec: dict, rank_offset: int, out: str) -> None:
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    # a server's scheduler has its own default group before any update group is made (SGLang asserts it)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}.default_pg", rank=0, world_size=1)
    runner = SimpleNamespace(tp_rank=0, device="cpu", _model_update_group={})
    ok, message = WeightUpdater.init_weights_update_group(runner, spec["address"], spec["port"], rank_offset,
                                                          spec["world_size"], spec["group_name"], backend="gloo")
    if not ok:
        sys.exit(f"sglang rank {rank_offset}: {message}")
    payload = spec["payload"]
    received = WeightUpdater.receive_weights_from_distributed(
        runner, names=payload["names"], dtypes=payload["dtypes"], shapes=payload["shapes"],
        group_name=payload["group_name"])
    torch.distributed.barrier(group=runner._model_update_group[spec["group_name"]])  # collective
    torch.save(received, out)
    print(f"sglang rank {rank_offset}: received", len(received), "tensors", flush=True)


if __name__ == "__main__":
    role, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_path).read())
    if role == "trainer":
        trainer(spec)
    else:
        sglang(spec, int(sys.argv[3]), sys.argv[4])
