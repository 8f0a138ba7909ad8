"""``RolloutConfig`` (the ``rollout`` section of ``OPDConfig``) and the engine factory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_opd.rollout.base import RolloutEngine
from megatron_opd.rollout.types import SamplingParams


@dataclass(kw_only=True)
class RolloutConfig:
    """How student rollouts are produced."""

    engine: str = "local"
    """"local" (in-process HF sampler on the trainer's student) or the http(s) URL of an SGLang server/router."""
    worker_urls: tuple[str, ...] = ()
    """SGLang workers behind a router, for weight sync and health checks (default: ``engine`` itself)."""
    n_samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    suppress_token_ids: tuple[int, ...] = ()
    renormalize_logprobs: bool = False
    """behaviour log-probs renormalised over the top-p/top-k nucleus (only matters when top_p < 1 or top_k > 0)."""
    seed: int = 0
    max_batch_rows: int = 512
    """in-process engine: rows per forward batch."""
    max_concurrency: int = 64
    """SGLang client: requests in flight."""
    timeout_s: float = 300.0
    max_retries: int = 4
    weight_sync_dir: str | None = None
    """SGLang: shared directory the trainer writes HF safetensors to before ``/update_weights_from_disk``."""

    def __post_init__(self) -> None:
        if self.engine != "local" and not self.engine.startswith(("http://", "https://")):
            raise ValueError(f"rollout.engine must be 'local' or an http(s) URL, got {self.engine!r}")
        if self.engine != "local" and self.weight_sync_dir is None:
            raise ValueError("rollout.weight_sync_dir is required with an SGLang engine (a path every worker reads)")
        self.sampling_params()  # validates the sampling fields

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids,
                              n=self.n_samples_per_prompt, seed=self.seed,
                              suppress_token_ids=self.suppress_token_ids,
                              renormalize_logprobs=self.renormalize_logprobs)


def build_rollout_engine(url_or_local, *, vocab_size: int | None = None, seed: int = 0, hf_config=None,
                         model=None, **options) -> RolloutEngine:
    """An SGLang client for an http(s) URL, else an in-process engine.

    url_or_local: URL of an SGLang server/router; "local" with ``model`` (an in-memory HF causal LM)
    or ``hf_config`` (a randomly initialised Qwen3 whose weights arrive with the first
    ``update_weights``); a local HF model dir; or an in-memory HF causal LM.
    options: passed to ``SGLangRolloutEngine`` (worker_urls, max_concurrency, timeout_s, max_retries,
    weight_sync_dir, …) or ``LocalRolloutEngine`` (max_batch_rows, dtype).
    """
    if isinstance(url_or_local, str) and url_or_local.startswith(("http://", "https://")):
        from megatron_opd.rollout.sglang_client import SGLangRolloutEngine

        return SGLangRolloutEngine(url_or_local, seed=seed, hf_config=hf_config, vocab_size=vocab_size, **options)
    from megatron_opd.rollout.local import LocalRolloutEngine

    if isinstance(url_or_local, str) and url_or_local == "local":
        if model is None and hf_config is None:
            raise ValueError("build_rollout_engine('local') needs model= (an HF causal LM) or hf_config=")
        url_or_local = model if model is not None else _empty_model(hf_config)
    elif isinstance(url_or_local, (str, Path)) and not Path(url_or_local).is_dir():
        raise FileNotFoundError(f"build_rollout_engine: {url_or_local} is neither an http(s) URL, 'local', "
                                "nor an HF model dir")
    return LocalRolloutEngine(url_or_local, vocab_size=vocab_size, seed=seed, **options)


def _empty_model(hf_config):
    """A causal LM of ``hf_config``'s architecture; its (random) weights are replaced by the first sync."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config)
