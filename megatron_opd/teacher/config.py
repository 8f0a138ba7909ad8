"""``TeacherConfig`` (the ``teacher`` section of ``OPDConfig``) and the engine factory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_opd.teacher.base import TeacherEngine


@dataclass(kw_only=True)
class TeacherConfig:
    """Where teacher scores come from."""

    engine: str
    """a local HF model dir (in-process forward) or the http(s) URL of an SGLang server/router."""
    top_k: int = 0
    """teacher top-K returned per response position (0: sampled-token log-probs only; LSM uses 32)."""
    temperature: float = 1.0
    """scoring temperature: must equal the temperature the objective uses (SGLang supports only 1)."""
    max_tokens_per_batch: int = 32768
    max_concurrency: int = 64
    timeout_s: float = 300.0
    max_retries: int = 4

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"teacher.top_k must be >= 0, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"teacher.temperature must be > 0, got {self.temperature}")
        remote = self.engine.startswith(("http://", "https://"))
        if remote and self.temperature != 1.0:
            raise ValueError("teacher.temperature must be 1.0 with an SGLang teacher (prompt log-prob "
                             "temperature scaling differs between SGLang versions); use a local teacher")


def build_teacher_engine(url_or_local, *, vocab_size: int | None = None, temperature: float = 1.0,
                         model_dir=None, model=None, **options) -> TeacherEngine:
    """An SGLang scorer for an http(s) URL, else an in-process teacher.

    url_or_local: URL of an SGLang server/router; "local" with ``model_dir`` (HF dir) or ``model``
    (in-memory HF causal LM); an HF dir; or an in-memory HF causal LM.
    """
    if isinstance(url_or_local, str) and url_or_local.startswith(("http://", "https://")):
        from megatron_opd.teacher.sglang import SGLangTeacher

        return SGLangTeacher(url_or_local, temperature=temperature, vocab_size=vocab_size, **options)
    if isinstance(url_or_local, str) and url_or_local == "local":
        url_or_local = model if model is not None else model_dir
        if url_or_local is None:
            raise ValueError("build_teacher_engine('local') needs model_dir= (an HF dir) or model=")
    if isinstance(url_or_local, (str, Path)) and not Path(url_or_local).is_dir():
        raise FileNotFoundError(f"build_teacher_engine: {url_or_local} is neither an http(s) URL nor an HF model dir")
    from megatron_opd.teacher.local import LocalTeacher

    return LocalTeacher(url_or_local, vocab_size=vocab_size, temperature=temperature, **options)
