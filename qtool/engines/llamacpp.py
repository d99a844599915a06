"""llama.cpp through llama-cpp-python: the engine of CPU deployments, which loads GGUF files.

A qtool checkpoint folder is first exported to GGUF (qtool.export.gguf: the lossless type for its
method, cached); a .gguf file is loaded as it is. Its environment (a source build of llama.cpp,
~9 min on 2 cores): scripts/setup-engine.sh llamacpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.engines.base import EngineJob, EngineRun
from qtool.engines.external import ExternalEngine


class LlamaCppEngine(ExternalEngine):
    name = "llamacpp"
    summary = "llama.cpp (llama-cpp-python, built from source), GGUF files, own venv, subprocess"
    inputs = "gguf"
    scores_windows = True
    worker = "llamacpp_worker.py"
    setup_minutes = "~9 min source build on 2 cores"

    def checkpoint_for(self, path: Path) -> Path:
        if path.is_file() and path.suffix == ".gguf":
            return path
        from qtool.export.gguf import NoLosslessType, cached_export

        try:
            return cached_export(path)
        except NoLosslessType as exc:
            raise _no_lossless(path, exc) from None

    def check_checkpoint(self, path: Path) -> None:
        """A folder needs a lossless GGUF type (qtool.export.gguf.default_type)."""
        from qtool.export.gguf import NoLosslessType, default_type, model_folder

        if path.is_file() and path.suffix == ".gguf":
            return
        try:
            default_type(model_folder(str(path)))
        except NoLosslessType as exc:
            raise _no_lossless(path, exc) from None

    def run(self, job: EngineJob) -> EngineRun:
        from qtool.export.gguf import tensor_types

        result = super().run(job)
        result.dtype = tensor_types(Path(job.model))
        return result


def _no_lossless(path: Path, exc: Any) -> Exception:
    """export's NoLosslessType for commands without export's --type flag: say which export to make."""
    from qtool.errors import SpecError

    return SpecError(f"{path} has no lossless GGUF ({exc.why}); export one that llama.cpp re-quantizes, "
                     f"`qtool export {path} --type {exc.suggested}`, and give its .gguf file instead")
