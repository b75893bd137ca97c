"""The README stays short, its links into docs/ resolve, and CI's main-job line is there.

Cheap text checks (no torch import). `.ci/run` takes the main job from the README with
``grep -m1 '^bash scripts/bench.sh' README.md``, so losing that line breaks CI silently.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# docs/ files other branches write; the README links them already. The lead empties this
# after merging those branches, so that a missing file then fails.
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _doc_links(text: str) -> list[str]:
    return [t for t in _LINK.findall(text) if t.startswith("docs/")]


def test_readme_is_at_most_250_lines():
    n = len(_readme().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/"


def test_readme_links_into_docs_exist():
    links = _doc_links(_readme())
    assert links, "README.md links no docs/ file"
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README.md links missing files: {missing}"


def test_docs_links_between_docs_exist():
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for target in _LINK.findall(doc.read_text(encoding="utf-8")):
            if "://" in target or not target.endswith(".md"):
                continue
            path = (doc.parent / target).resolve()
            assert path.exists(), f"{doc.name} links missing {target}"


def test_link_check_can_fail():
    """The link pattern finds a docs/ link, so a missing file would be reported."""
    assert _doc_links("see [x](docs/nope.md#part) and [y](https://e.org)") == ["docs/nope.md"]
    assert not (ROOT / "docs/nope.md").exists()


def test_ci_main_job_line_is_in_the_commands_block():
    """The line .ci/run extracts exists, inside a ```bash block, with the test command."""
    text = _readme()
    main = [ln for ln in text.splitlines() if ln.startswith("bash scripts/bench.sh")]
    assert main, "no line starting 'bash scripts/bench.sh' in README.md (.ci/run needs it)"
    assert re.sub(r"\s*#.*$", "", main[0]) == "bash scripts/bench.sh --quick"
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    block = next((b for b in blocks if main[0] in b.splitlines()), None)
    assert block is not None, "the main-job line is not inside a ```bash block"
    assert any(ln.startswith("bash scripts/test.sh") for ln in block.splitlines())
    assert "grep -m1 '^bash scripts/bench.sh' README.md" in (ROOT / ".ci/run").read_text()


def test_table_markers_present_once():
    """The generated tables' markers: each start before its end, exactly once."""
    text = _readme()
    for name in ("support-table", "gpu-table"):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert text.count(start) == 1 and text.count(end) == 1, name
        assert text.index(start) < text.index(end), name
