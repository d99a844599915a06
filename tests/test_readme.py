"""The README's cheap commands work exactly as shown, and every relative link in the docs resolves.

Only commands that finish in seconds run here (`qtool --help`, `qtool COMMAND --help`, the
listings); the README's quantize/eval/compare/qlora examples take minutes and are covered by
their own tests.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO, run_qtool

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMANDS = ("quantize", "eval", "compare", "qlora", "chat", "merge", "generate", "methods", "recipes", "models",
            "engines", "serve-check", "export", "plan", "webui")
SHELL_FENCES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def shell_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang.strip().lower() in SHELL_FENCES]


def qtool_commands(text: str) -> list[list[str]]:
    """Every `qtool ...` command in the fenced shell blocks, as argv after `qtool`.

    Backslash continuations are joined, comments dropped, and each part of a pipeline or `&&` chain
    that starts with `qtool` counts (so `printf ... | qtool chat ...` is a chat command).
    """
    commands = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True  # words as the shell splits them; `#` starts a comment
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token in ("|", "||", "&&", ";", "&"):
                    if words and words[0] in ("qtool", ".venv/bin/qtool"):
                        commands.append(words[1:])
                    words = []
                else:
                    words.append(token)
    return commands


def is_cheap(args: list[str]) -> bool:
    """Help and listings: they read no model and write nothing."""
    if args and args[-1] in ("--help", "-h") and len(args) <= 2:
        return True
    if args[:1] in (["methods"], ["models"], ["engines"]) and set(args[1:]) <= {"--json"}:
        return True
    return args == ["recipes", "list"]


README_COMMANDS = qtool_commands(README.read_text(encoding="utf-8"))
CHEAP = list(dict.fromkeys(shlex.join(args) for args in README_COMMANDS if is_cheap(args)))


@cache
def run(command: str) -> subprocess.CompletedProcess:
    """One fresh `qtool` process per distinct command, shared by the tests below."""
    return run_qtool(*shlex.split(command), timeout=120)


def test_readme_shows_every_command():
    shown = {shlex.join(args) for args in README_COMMANDS}
    required = {"--help", "methods", "models", "recipes list", *(f"{c} --help" for c in COMMANDS)}
    assert not required - shown, f"README.md lacks: {sorted('qtool ' + c for c in required - shown)}"
    examples = {args[0] for args in README_COMMANDS if args and "--help" not in args}
    assert not set(COMMANDS) - examples, f"README.md has no example of: {sorted(set(COMMANDS) - examples)}"


@pytest.mark.parametrize("command", CHEAP)
def test_readme_command_runs_as_shown(command):
    proc = run(command)
    assert proc.returncode == 0, f"qtool {command}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"qtool {command} printed nothing"
    assert "Traceback" not in proc.stderr


def test_readme_methods_table_lists_every_method():
    """The README's methods table names exactly the methods `qtool methods` lists."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    in_table = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", section, re.M)}
    proc = run("methods")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line and not line[0].isspace()}
    assert in_table == listed


def test_readme_stays_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; depth belongs in docs/"


# ---- links ----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks, inline code spans and HTML comments (no links there)."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1/-2 for repeats."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading #{fragment} in {file.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_results_page_is_current():
    """docs/results.md is exactly what benchmarks/results_page.py writes from reports/."""
    proc = subprocess.run([sys.executable, "benchmarks/results_page.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
