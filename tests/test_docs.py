"""The documentation is tested: every ```bash / ```python block of README.md and docs/*.md runs, as
printed, against the session's HTTP stack (tests/docs_snippets.py has the conventions; Sybil's
Markdown parsers find the blocks); every block that is not run says why, visibly; ```yaml configs
validate; the README's "Where things live" table matches the tree; the links between pages resolve;
and a page with a drifted snippet fails (shown once, on a throwaway page)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_snippets import (ROOT, Block, DocsStack, SnippetFailed, block_problems, doc_pages, fenced_blocks,
                           page_examples, run_bash)

PAGES = doc_pages()
# The README's blocks are the quick start: fast. The manual's pages generate long videos, extensions,
# voice-overs ...: the whole suite runs them.
FAST_PAGES = {"README.md"}


def _cases():
    for page in PAGES:
        for example in page_examples(page):
            marks = [pytest.mark.fast] if page.name in FAST_PAGES else []
            yield pytest.param(example, id=example.region.block.where, marks=marks)


@pytest.fixture(scope="session")
def docs_stack(http_env, tmp_path_factory) -> DocsStack:
    """The session stack as a reader of the docs has it after `make run`: a user and an API key."""
    return DocsStack(http_env.url, http_env.user().api_key, tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("example", list(_cases()))
def test_snippet_runs(docs_stack, example):
    """Sybil evaluates the block (tests/docs_snippets.py: _evaluate) in its page's namespace."""
    example.namespace["docs_stack"] = docs_stack
    example.evaluate()


@pytest.mark.fast
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_blocks_follow_the_conventions(page: Path):
    """Every block is run, or run by a named test, or visibly marked as not run; configs validate."""
    assert block_problems(page) == []


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    in_fence = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


@pytest.mark.fast
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page: Path):
    """Relative links name files that exist, and #anchors headings that exist."""
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    assert bad == []


# --- the README's "Where things live" table ------------------------------------------------------

CODE_ROOTS = ("serve", "client", "deployments", "loadtests")


def where_things_live(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    return [m.group(1).rstrip("/") for m in re.finditer(r"^\| `([^`]+)` \|", section, re.M)]


def uncovered(listed: list[str], root: Path = ROOT) -> list[str]:
    """Folders and modules under the code roots that no listed path names or contains."""
    def covered(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in listed)

    missing = []
    for top in CODE_ROOTS:
        base = root / top
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel or path.name == "__init__.py":
                continue
            is_module_dir = path.is_dir()
            is_top_module = path.suffix == ".py" and path.parent == base  # e.g. serve/config.py
            if (is_module_dir or is_top_module) and not covered(rel):
                missing.append(rel)
    return missing


@pytest.mark.fast
def test_where_things_live_matches_the_tree():
    listed = where_things_live()
    assert len(listed) >= 10
    assert [p for p in listed if not (ROOT / p).exists()] == [], "listed paths that do not exist"
    assert uncovered(listed) == [], "folders/modules missing from README's 'Where things live'"


@pytest.mark.fast
def test_where_things_live_check_catches_a_new_folder(tmp_path):
    """The table check fails when the tree gains a folder the table does not list."""
    for top in CODE_ROOTS:
        (tmp_path / top).mkdir()
    (tmp_path / "serve" / "pipeline").mkdir()
    (tmp_path / "serve" / "newroom").mkdir()
    (tmp_path / "serve" / "app.py").write_text("")
    assert uncovered(["serve/app.py", "serve/pipeline"], tmp_path) == ["serve/newroom"]


# --- drift fails the suite -----------------------------------------------------------------------

DRIFTED = """# A page whose snippets drifted from the code

The route was renamed, so this prints the API's error envelope:

```bash
curl -s http://localhost:8000/v1/videos/video_gone -H "Authorization: Bearer $CINEVIVID_API_KEY"
```

A flag that the CLI no longer has:

```bash
cinevivid videos list --no-such-flag
```

An SDK call on a video that does not exist:

```python
from openai import OpenAI

client = OpenAI(base_url="http://localhost:8000/v1", api_key="cv-...")
client.videos.retrieve("video_gone")
```

An undefined variable:

```bash
curl -s http://localhost:8000/v1/videos/$VIDEO_ID -H "Authorization: Bearer $KEY"
```

And a block that is not run, with no reason given:

```text
kubectl apply -f rayservice.yaml
```

```
$ cinevivid up
```

```yaml
levers: {no_such_lever: 1}
```
"""


@pytest.mark.fast
def test_a_drifted_snippet_fails(docs_stack, tmp_path):
    """A throwaway page with drifted snippets: every one of them fails, and so do the checks."""
    page = tmp_path / "drifted.md"
    page.write_text(DRIFTED)
    examples = page_examples(page)
    assert [e.region.block.language for e in examples] == ["bash", "bash", "python", "bash"]
    for example in examples:  # as test_snippet_runs runs them
        example.namespace["docs_stack"] = docs_stack
        with pytest.raises(SnippetFailed):
            example.evaluate()
    problems = block_problems(page)
    assert any("```text block must follow" in p for p in problems)
    assert any("command in a block with no language" in p for p in problems)
    assert any("not a valid config" in p for p in problems)
    # ... and fixed, the same page passes
    fixed = Block(page, 1, "bash", "curl -s http://localhost:8000/v1/videos -H \"Authorization: Bearer cv-...\"\n", "")
    assert '"object"' in run_bash(docs_stack, fixed)
    assert [b.language for b in fenced_blocks(page)] == ["bash", "bash", "python", "bash", "text", "", "yaml"]
