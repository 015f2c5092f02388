"""The documentation's code blocks as tests (tests/test_docs.py), with Sybil's Markdown parsers.

The conventions a writer follows (docs/architecture.md, "How the snippets are tested", says the same
for readers of the docs):

- ```bash and ```python blocks are run, in page order, against the session's HTTP stack (the tiny
  models, tests/http_fixtures.py) as printed, with only these substitutions, which the README tells
  the user to make: `localhost:8000` / `127.0.0.1:8000` become the stack's address, `cv-...` a real
  API key. `$CINEVIVID_URL` and `$CINEVIVID_API_KEY` are set (the README's quick start exports them),
  and `.venv/bin` is first on PATH (`cinevivid`, `python`).
- Each page runs in a fresh folder of its own, holding `cat.png` and `end.png` (small pictures, for
  image-to-video); the python blocks of one page share one namespace, the bash blocks share nothing
  (each is `bash -euo pipefail`: set what a block needs in it).
- A block fails when it exits non-zero, raises, or prints the API's error envelope (`"error": {`)
  -- unless it holds the comment `# expect: error`.
- A block that cannot run here (a GPU, a CUDA install, kubectl, docker, a real cluster) is a ```text
  block right after a visible line `*Not run by the test suite: <reason>.*`.
- A ```bash/```python block that another test runs as printed (it needs a stack of its own) comes
  right after a visible line `*Run by tests/<file>.py: <reason>.*`; that file must read the page.
- ```yaml blocks must parse; those that are Serve configs (`applications:`) or fragments of `args:`
  (top-level keys of serve.config.AppArgs) are validated by AppArgs.
- A block with no language is for output and diagrams: no line of it may look like a command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

NOT_RUN = re.compile(r"^\*Not run by the test suite: .+\.\*\s*$")
RUN_BY = re.compile(r"^\*Run by (tests/[\w/]+\.py)(?:[:,] .+)?\.\*\s*$")
ENVELOPE = re.compile(r'"error"\s*:\s*\{')
EXPECT_ERROR = "# expect: error"
RUN_LANGUAGES = ("bash", "python")
LANGUAGES = {"bash", "python", "yaml", "text", "json", ""}
# a line in a bare (output/diagram) block that looks like a command someone would type
COMMAND_LIKE = re.compile(r"^\s*(\$ |curl |cinevivid |make |python3? |pip |kubectl |docker |ray |serve |export )")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<lang>[^\s`]*).*$")


def doc_pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page in docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    marker: str  # the last non-blank line before the fence

    @property
    def where(self) -> str:
        try:
            return f"{self.path.relative_to(ROOT)}:{self.line}"
        except ValueError:
            return f"{self.path.name}:{self.line}"

    @property
    def run_by(self) -> str | None:
        m = RUN_BY.match(self.marker)
        return m.group(1) if m else None


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with its language and the line just before it."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group("fence"), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        blocks.append(Block(path, start + 1, m.group("lang").lower(), "\n".join(lines[start + 1:j]) + "\n",
                            lines[k].strip() if k >= 0 else ""))
        i = j + 1
    return blocks


def block_problems(path: Path) -> list[str]:
    """What is wrong with a page's blocks by the conventions above (nothing run here)."""
    problems = []
    for b in fenced_blocks(path):
        if b.language not in LANGUAGES:
            problems.append(f"{b.where}: ```{b.language} block: use bash, python, yaml, json or text "
                            "(or no language for output)")
        if b.language == "text" and not NOT_RUN.match(b.marker):
            problems.append(f"{b.where}: a ```text block must follow a visible line "
                            "'*Not run by the test suite: <reason>.*'")
        if b.language in RUN_LANGUAGES and NOT_RUN.match(b.marker):
            problems.append(f"{b.where}: a block that is not run goes in ```text, not ```{b.language}")
        if b.language in RUN_LANGUAGES and b.run_by:
            test = ROOT / b.run_by
            page = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
            if not test.exists():
                problems.append(f"{b.where}: {b.run_by} does not exist")
            elif page not in test.read_text():
                problems.append(f"{b.where}: {b.run_by} does not read {page}")
        if b.language == "":
            for n, line in enumerate(b.source.splitlines(), b.line + 1):
                if COMMAND_LIKE.match(line):
                    problems.append(f"{b.path.name}:{n}: a command in a block with no language: "
                                    "make it ```bash (run) or ```text after a 'Not run' line")
        if b.language == "yaml":
            problems += [f"{b.where}: {p}" for p in yaml_problems(b.source)]
    return problems


def yaml_problems(source: str) -> list[str]:
    import yaml
    from pydantic import ValidationError

    from serve.config import AppArgs

    try:
        docs = [d for d in yaml.safe_load_all(source) if d is not None]
    except yaml.YAMLError as e:
        return [f"not valid YAML: {e}"]
    problems = []
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if "applications" in doc:
            candidates = [app.get("args", {}) for app in doc["applications"]]
        elif set(doc) <= set(AppArgs.model_fields):
            candidates = [doc]
        else:
            continue  # not a CineVivid config (a Kubernetes manifest, ...): parsing is the check
        for args in candidates:
            try:
                AppArgs.model_validate(args)
            except ValidationError as e:
                problems.append(f"not a valid config: {e}")
    return problems


# --- running the blocks -------------------------------------------------------------------------


@dataclass
class DocsStack:
    """Where the snippets run: the stack's URL, an API key, and a working folder per page."""
    url: str
    api_key: str
    work_root: Path

    def substitute(self, source: str) -> str:
        host = self.url.split("://", 1)[1]
        for address in ("localhost:8000", "127.0.0.1:8000"):
            source = source.replace(f"http://{address}", self.url).replace(address, host)
        return source.replace("cv-...", self.api_key)

    def workdir(self, page: str) -> Path:
        d = self.work_root / re.sub(r"\W", "_", page)
        if not d.exists():
            d.mkdir(parents=True)
            make_pictures(d)
        return d

    def env(self) -> dict:
        return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                "CINEVIVID_URL": self.url, "CINEVIVID_API_KEY": self.api_key}


def make_pictures(folder: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 120, 40)).save(folder / "cat.png")
    Image.new("RGB", (64, 48), (40, 80, 200)).save(folder / "end.png")


class SnippetFailed(AssertionError):
    pass


def run_bash(stack: DocsStack, block: Block, timeout_s: float = 600) -> str:
    src = stack.substitute(block.source)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", src], cwd=stack.workdir(block.path.name),
                          env=stack.env(), capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SnippetFailed(f"{block.where}: exit {proc.returncode}\n--- block ---\n{src}--- output ---\n{out[-4000:]}")
    if ENVELOPE.search(proc.stdout) and EXPECT_ERROR not in block.source:
        raise SnippetFailed(f"{block.where}: printed an API error\n--- block ---\n{src}--- output ---\n{out[-4000:]}")
    return out


def run_python(stack: DocsStack, block: Block, namespace: dict) -> None:
    src = stack.substitute(block.source)
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update({k: v for k, v in stack.env().items() if k.startswith("CINEVIVID_")})
    os.chdir(stack.workdir(block.path.name))
    try:
        exec(compile(src, block.where, "exec"), namespace)  # noqa: S102 - the documentation's own code
    except Exception as e:
        if EXPECT_ERROR in block.source:
            return
        raise SnippetFailed(f"{block.where}: {type(e).__name__}: {e}\n--- block ---\n{src}") from e
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _evaluate(example) -> None:
    """Sybil's evaluator for a ```bash / ```python region: run it against the stack that the test put
    in the page's namespace (`docs_stack`), python blocks in that namespace."""
    block = example.region.block
    stack = example.namespace["docs_stack"]
    if block.language == "bash":
        run_bash(stack, block)
    else:
        run_python(stack, block, example.namespace)


def page_examples(path: Path) -> list:
    """The ```bash/```python blocks of a page that the suite runs, in page order, as Sybil examples
    (Sybil's Markdown code-block parser finds them; the examples of a page share its namespace).
    Those marked `*Run by tests/...*` are left to that test."""
    parsers = [CodeBlockParser(language=lang, evaluator=_evaluate) for lang in RUN_LANGUAGES]
    document = Sybil(parsers=parsers, path=str(path.parent)).parse(path)
    marked = {b.line: b for b in fenced_blocks(path)}
    examples = []
    for example in document:
        block = marked.get(int(example.line))
        if block is None or block.language not in RUN_LANGUAGES or block.source != example.parsed:
            raise AssertionError(f"{path.name}:{example.line}: Sybil and the fence reader disagree")
        example.region.block = block
        if block.run_by is None:
            examples.append(example)
    return examples


def sybil_blocks(path: Path) -> list[Block]:
    return [example.region.block for example in page_examples(path)]
