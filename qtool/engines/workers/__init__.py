"""Scripts that run inside a serving engine's own environment (never imported by qtool).

Each is started as `ENGINE_PYTHON worker.py JOB.json RESULT.json` by qtool.engines.external: it
reads the job (checkpoint, prompt token ids, speed settings), loads the checkpoint in its engine,
and writes one JSON result. They use only the standard library and their engine, because the
engine's environment does not have qtool (its pins conflict with qtool's).
"""
