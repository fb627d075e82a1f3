"""The documentation is executable: every ```python block of README.md and docs/*.md runs, every relative link
resolves, and the README stays short.

Per file, the python blocks run in order in one shared namespace (a later block may use what an earlier one
defined), in a fresh working directory. A block whose fence is directly preceded by the line ``<!-- slow -->``
runs only in the slow test (``pytest -m slow``), which runs every block of the file; the default run leaves the
slow blocks out. Blocks that are not meant to run are fenced ```text or ```bash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SLOW_TAG = "<!-- slow -->"
README_MAX_LINES = 220


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    slow: bool


def _blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` (fences at the start of a line), in order."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        assert end < len(lines), f"{page.name}:{i + 1}: unclosed code fence"
        slow = i > 0 and lines[i - 1].strip() == SLOW_TAG
        out.append(Block(page, start + 1, m.group(1), "\n".join(lines[start:end]) + "\n", slow))
        i = end + 1
    return out


def _python(page: Path) -> list[Block]:
    return [b for b in _blocks(page) if b.lang == "python"]


def _run(blocks: list[Block]) -> None:
    namespace: dict = {"__name__": "docs"}
    for b in blocks:
        # padded so that a traceback names the page and the line of the page
        code = compile("\n" * (b.line - 1) + b.code, str(b.page.relative_to(ROOT)), "exec")
        exec(code, namespace)


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


FAST = [p for p in PAGES if any(not b.slow for b in _python(p))]
SLOW = [p for p in PAGES if any(b.slow for b in _python(p))]


def test_the_pages_have_runnable_examples():
    assert FAST, "no runnable ```python block in README.md or docs/"
    assert (ROOT / "docs").is_dir()


@pytest.mark.parametrize("page", FAST, ids=_name)
def test_examples_run(page, tmp_path, monkeypatch):
    """The page's python blocks, the slow ones left out, run in order in one namespace."""
    monkeypatch.chdir(tmp_path)
    _run([b for b in _python(page) if not b.slow])


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW, ids=_name)
def test_slow_examples_run(page, tmp_path, monkeypatch):
    """Every python block of the page, the slow ones included, in order in one namespace."""
    monkeypatch.chdir(tmp_path)
    _run(_python(page))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not in code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor in inline code
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading with that anchor in {path.name}")
    assert not broken, f"{_name(page)} has broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES}: move detail into docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    missing = [_name(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


def test_the_command_line_page_has_the_block_the_cli_test_runs():
    text = (ROOT / "docs" / "cli.md").read_text()
    assert "\n## From the command line\n" in text
    section = text.split("\n## From the command line\n", 1)[1]
    assert re.search(r"```bash\n(.*?)```", section, flags=re.S), "no ```bash block after '## From the command line'"
