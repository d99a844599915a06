"""Evaluators: each takes a loaded model and returns a plain dataclass."""
