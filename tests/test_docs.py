"""Every reference in the documentation resolves inside the repository: relative Markdown links
(and their #anchors), repository paths named in the README, docs/ and docstrings; and nothing
outside the tests points at files that are not part of the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
CODE_FOLDERS = ("tricoclr", "data_tools", "benchmarks")
# A repository path: one of these folders, then a path; not part of a longer path (runs/tricoclr/x).
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:tricoclr|data_tools|docs|configs|benchmarks|slurm)/[\w./-]*\w)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FORBIDDEN = re.compile(r"\.\./shared|DESIGN\.md")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    in_code, found = False, set()
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def docstrings(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def test_relative_markdown_links_resolve():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, fragment = target.partition("#")
            resolved = (doc.parent / file).resolve() if file else doc
            if not resolved.exists() or REPO.resolve() not in (resolved, *resolved.parents):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors_of(resolved):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_repository_paths_named_in_docs_and_docstrings_exist():
    texts = [(str(doc.relative_to(REPO)), doc.read_text()) for doc in DOCS]
    for folder in CODE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            texts += [(str(path.relative_to(REPO)), text) for text in docstrings(path)]
    missing = sorted(
        {f"{where}: {name}" for where, text in texts for name in REPO_PATH.findall(text) if not (REPO / name).exists()}
    )
    assert not missing, "\n".join(missing)


def test_nothing_outside_the_tests_points_outside_the_repository():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    found = []
    for name in files:
        path = REPO / name
        if name.startswith("tests/") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        found += [f"{name}: {match}" for match in FORBIDDEN.findall(text)]
    assert not found, "\n".join(found)
