"""The docs that describe the code are checked against it: ``docs/architecture.md``'s module
map names every module under ``spark_ddl/`` and none that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMES = re.compile(r"(?:\w+(?:\.py|/)|,\s*|\s*\(\+\s*|\))+")


def modules_in_tree() -> set[str]:
    """Every module as a path relative to the repository ('spark_ddl/sync/base.py')."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "spark_ddl").rglob("*.py")}


def modules_in_map(text: str) -> list[str]:
    """The modules the first code block of ``text`` names. A line whose first column (up to two
    spaces) is only file names (``a.py, b.py``) or a folder (``name/``, its ``__init__.py``)
    names them, nested under the closest less-indented folder; other lines are descriptions."""
    block = text.split("```")[1]
    stack: list[tuple[int, str]] = []
    named = []
    for line in block.splitlines():
        body = line.lstrip()
        indent = len(line) - len(body)
        head = re.split(r"\s{2,}", body)[0]
        if not body or not NAMES.fullmatch(head):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        for token in re.findall(r"\w+\.py|\w+/", head):
            if token.endswith("/"):
                named.append(f"{parent}{token}__init__.py")
                stack.append((indent, parent + token))
            else:
                named.append(parent + token)
    return named


def test_module_map_names_every_module_and_only_existing_ones():
    named = modules_in_map((ROOT / "docs" / "architecture.md").read_text())
    tree = modules_in_tree()
    assert sorted(tree - set(named)) == [], "modules missing from docs/architecture.md's map"
    assert sorted(set(named) - tree) == [], "docs/architecture.md's map names modules that do not exist"


def test_the_map_parser_reads_folders_lists_and_descriptions():
    text = "```\npkg/\n  a.py, b.py   one (c.py)\n               d.py continues\n  sub/\n    e.py (+ f.py)\n  g.py\n```"
    assert modules_in_map(text) == ["pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py",
                                    "pkg/sub/e.py", "pkg/sub/f.py", "pkg/g.py"]


def test_links_and_images_of_the_readme_and_docs_resolve():
    """Every relative link or image of README.md and docs/*.md names a file that exists,
    relative to the page that shows it."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []


def test_the_readme_stays_a_page_for_users():
    """Details belong in docs/: the README is what it is, the two commands, a quick start and a
    paragraph per capability (issue 26: at most ~350 lines)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350
