"""What a commit and the wheel hold: every file of the package, none left out by a .gitignore pattern."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_file_of_the_package_is_git_ignored():
    """A pattern meant for a folder of runs (runs/) once matched vaecli/runs/ as well: its new __init__.py was
    never committed, and hatchling, which leaves out what .gitignore names, built a wheel without vaecli.runs."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    files = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "vaecli").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        input="\n".join(files),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == []
