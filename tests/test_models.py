import pytest

from qtool.errors import CheckpointError, ModelNotFoundError
from qtool.models import builtin_gguf_path, quantizable_linears, resolve_model


def test_builtin_alias_resolves_to_cached_hf_folder(smollm2):
    assert smollm2.kind == "builtin"
    config = smollm2.config()
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert not getattr(config, "quantization_config", None), "the cached folder must be plain fp weights"


def test_gguf_file_resolves_to_the_same_cache(smollm2):
    source = resolve_model(str(builtin_gguf_path("smollm2-135m")))
    assert source.kind == "gguf"
    assert source.location == smollm2.location


def test_hf_folder_resolves(tiny_llama):
    source = resolve_model(str(tiny_llama))
    assert source.kind == "folder"
    assert source.config().hidden_size == 64


def test_quantizable_linears_skip_the_head(smollm2):
    linears = quantizable_linears(smollm2.config())
    assert len(linears) == 30 * 7
    assert "lm_head" not in linears
    assert {m.in_features for m in linears.values()} == {576, 1536}


@pytest.mark.parametrize("name", ["./no/such/model", "/nonexistent/model", "missing.gguf"])
def test_missing_path_is_a_clear_error(name):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(name)


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_fails_fast_with_one_reason(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.qtool-test.invalid")  # .invalid never resolves
    with pytest.raises(ModelNotFoundError, match="Hub is unreachable"):
        resolve_model("someorg/some-model")


def test_hf_hub_offline_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model("someorg/some-model")


def test_processes_started_together_share_one_gguf_conversion(tmp_path):
    """Two processes on an empty cache: one converts, the other waits for it and uses its folder."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = "from qtool.models import resolve_model; print(resolve_model('smollm2-135m').location)"
    env = {**os.environ, "QTOOL_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1
    cached = [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert cached == [os.path.basename(folders.pop())]  # no second copy, no temporary left


def test_installed_versions_are_the_locked_ones():
    """constraints/lock.txt is what scripts/setup-venv.sh installs: this environment must match it."""
    import importlib.metadata

    from tests.conftest import REPO

    lock = REPO / "constraints" / "lock.txt"
    pins = dict(line.split("==", 1) for line in lock.read_text().splitlines() if line and not line.startswith("#"))

    def installed(name):
        try:  # the first distribution on sys.path, as imports see it (not a copy vendored inside setuptools)
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    wrong = {name: (version, installed(name)) for name, version in pins.items() if installed(name) != version}
    assert not wrong, f"installed versions differ from constraints/lock.txt (pinned, installed): {wrong}"
