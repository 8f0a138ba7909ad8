"""Helpers for tests and for trying the project on one machine (no training code depends on them)."""
