"""A backend is one file: a copy of the tree plus one new module in qtool/backends, nothing else.

The new module is rtn under another name that also declares a package (PyYAML, importable as
`yaml`), so the test sees the registry, the CLI, qtool.json's recorded versions and the
registry tests pick it up with no other file edited.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from .conftest import REPO


def test_a_copy_of_rtn_under_another_name_is_a_complete_backend(tiny_llama, tmp_path):
    tree = tmp_path / "tree"
    for part in ("qtool", "tests", "calib_data", "pyproject.toml"):
        source = REPO / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tree / part,
                                                               **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    rtn = (REPO / "qtool" / "backends" / "rtn.py").read_text()
    copy = (rtn.replace('name = "rtn"', 'name = "rtncopy"').replace("class RtnBackend", "class RtnCopyBackend")
            .replace("format=", 'packages={"yaml": "core"},\n        format='))
    assert copy.count("rtncopy") == 1 and "packages=" in copy
    (tree / "qtool" / "backends" / "rtn_copy.py").write_text(copy)
    env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tree, env=env, timeout=600)

    methods = run("-m", "qtool.cli", "methods", "--json")
    assert methods.returncode == 0, methods.stderr
    rows = {row["method"]: row for row in json.loads(methods.stdout)}
    assert rows["rtncopy"]["ready"] and rows["rtncopy"]["options"][0]["name"] == "sym"

    out = tmp_path / "out"
    quantized = run("-m", "qtool.cli", "quantize", "--method", "rtncopy", "--bits", "4", "--group-size", "32",
                    "--device", "cpu", "--json", "--quiet", str(tiny_llama), str(out))
    assert quantized.returncode == 0, quantized.stderr
    record = json.loads((out / "qtool.json").read_text())
    assert record["method"] == "rtncopy" and record["spec"]["bits"] == 4
    assert "pyyaml" in record["versions"]

    registry_tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_registry.py",
                         "-k", "every_backend_module or unknown_method or bits_outside")
    assert registry_tests.returncode == 0, registry_tests.stdout[-3000:]
