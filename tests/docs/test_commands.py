"""Every command the README and docs/ show names a module or file that exists."""
import importlib.util
import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def commands(text: str) -> list[str]:
    """Shell lines of the page: fenced code lines and inline `code` spans, continuations joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]+)`", text)
    return [line.split("#", 1)[0].strip() for line in lines]


def named_targets(line: str) -> list[tuple[str, str]]:
    """(kind, name) of what a command line runs: modules after `python -m`, scripts, config and launch paths."""
    out = [("module", m) for m in re.findall(r"python3? -m ([\w.]+)", line)]
    out += [("file", f) for f in re.findall(r"(?:python3?|accelerate launch(?: --[\w-]+(?: [^\s-][^\s]*)?)*) "
                                            r"((?:train|bench|data|index|launch|tests)/[\w/.-]+\.py)", line)]
    out += [("file", f) for f in re.findall(r"(?<![\w/])((?:launch|bench|tests|\.ci)/[\w/.-]+\.(?:yaml|sbatch|sh|py))",
                                            line)]
    out += [("file", f) for f in re.findall(r"(?:bash|sbatch) ((?:launch|tests|\.ci)/[\w/.-]+)", line)]
    return out


def exists(kind: str, name: str) -> bool:
    if kind == "file":
        return (REPO / name).exists()
    local = REPO / name.replace(".", "/")
    if local.with_suffix(".py").is_file() or (local / "__main__.py").is_file():
        return True
    if name.split(".")[0] in ("data", "index", "train", "bench"):
        return False  # ours: must exist in the repository
    return importlib.util.find_spec(name) is not None  # pytest, pip, venv, ...


def test_pages_name_commands():
    found = [t for page in PAGES for line in commands(page.read_text()) for t in named_targets(line)]
    assert len(found) > 30  # the extraction works: README and docs are full of commands
    assert ("module", "data.prepare") in found and ("file", "train/main.py") in found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_names_something_that_exists(page):
    missing = sorted({f"{kind} {name}" for line in commands(page.read_text()) for kind, name in named_targets(line)
                      if not exists(kind, name)})
    assert not missing, f"{page.name} names what does not exist: {missing}"
