"""Exports of qtool checkpoints to deployment formats (GGUF for llama.cpp: qtool.export.gguf)."""
