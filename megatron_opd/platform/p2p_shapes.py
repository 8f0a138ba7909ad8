"""Megatron-Core 0.16.1's pipeline shape exchange, made unambiguous for a pipeline of 2 ranks.

With ``variable_seq_lengths`` the pipeline sends each tensor's shape before the tensor
(``P2PCommunicator._communicate_shapes``). It posts send-prev, recv-prev, send-next and recv-next in
one ``batch_isend_irecv``. In a pipeline of 2 ranks the previous and next rank are the same peer,
and point-to-point messages between one pair match in the order they are posted, not by direction.
In the interleaved (VPP) schedule's combined step, which sends an activation forward and a gradient
backward at once, the two shapes arrive crossed: the activation buffer gets the gradient's shape and
the next transfer fails (gloo: "Received data size doesn't match expected size"; NCCL corrupts
silently). Known upstream: NVIDIA/Megatron-LM issues #1450 and #5100.

The fix here exchanges the two directions one after the other when the peers coincide: first the
forward shapes (send-next with the peer's recv-prev), then the backward ones. Every rank of the pair
runs the same two phases in the same order, so each phase holds messages of one direction only.
Pipelines of more than 2 ranks keep Megatron's exchange unchanged.

The tensors themselves are not affected on CPU, where the project runs unbatched P2P
(``batch_p2p_comm=False``): Megatron then sends the two directions over two process groups.
"""

from __future__ import annotations

_ORIGINAL = None


def _communicate_shapes_by_direction(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    both_ways = (tensor_send_next is not None or recv_prev) and (tensor_send_prev is not None or recv_next)
    if self.prev_rank != self.next_rank or not both_ways or self.config.use_ring_exchange_p2p:
        return _ORIGINAL(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
    # collective (P2P with the one peer): forward shapes first, then backward shapes.
    recv_prev_shape, _ = _ORIGINAL(self, tensor_send_next, None, recv_prev, False)
    _, recv_next_shape = _ORIGINAL(self, None, tensor_send_prev, False, recv_next)
    return recv_prev_shape, recv_next_shape


def apply_p2p_shape_fix() -> None:
    """Install the direction-by-direction shape exchange (idempotent)."""
    global _ORIGINAL
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if _ORIGINAL is None:
        _ORIGINAL = P2PCommunicator._communicate_shapes
        P2PCommunicator._communicate_shapes = _communicate_shapes_by_direction
