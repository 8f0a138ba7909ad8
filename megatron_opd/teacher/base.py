"""The teacher interface the trainer is coded against."""

from __future__ import annotations

from abc import ABC, abstractmethod

from megatron_opd.teacher.types import TeacherScore


class TeacherEngine(ABC):
    """Scores full sequences (prompt + response) with the teacher, response-aligned.

    ``score(prompts, responses, top_k)[i].token_logprobs[t]`` = log q(responses[i][t] | prompt, y_<t);
    with ``top_k > 0`` also the teacher's top-K ids and full-vocab log-probs at every response
    position, sorted descending. Log-probs are at ``self.temperature`` (the objective's).
    """

    temperature: float = 1.0

    @abstractmethod
    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int = 0) -> list[TeacherScore]:
        """One TeacherScore per (prompt, response) pair, in order."""

    def close(self) -> None:
        """Releases servers/threads; the default has nothing to release."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
