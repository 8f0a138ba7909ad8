"""Rollout engines: SGLang client and in-process sampler behind one interface."""
