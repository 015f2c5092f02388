"""The package's layers, checked: upper layers import lower ones, never the reverse, and a stage
replica loads no database, auth or HTTP-server code.

    serve.{errors, stages}  <  serve.frames  <  serve.{config, contracts}  <  serve.runtime
        <  serve.pipeline, serve.media  <  serve.jobs
        <  serve.api  <  deployments, client  <  serve.app, serve.ops

and no module of serve/, deployments/ or client/ sits on an import circle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # the fast tier (make test)

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "serve"

GROUND = ("serve.config", "serve.errors", "serve.frames", "serve.contracts", "serve.stages")
# what each layer may import from the project (besides the standard library and third parties)
ALLOWED = {
    "serve.errors": set(),
    "serve.stages": set(),  # the stage registry: names, class paths, live levers, default options
    "serve.frames": {"serve.errors"},
    "serve.config": {"serve.errors", "serve.frames", "serve.stages"},
    "serve.contracts": {"serve.frames"},
    "serve.runtime": {*GROUND, "serve.runtime"},
    "serve.pipeline": {*GROUND, "serve.runtime", "serve.pipeline"},
    "serve.media": {*GROUND, "serve.runtime", "serve.pipeline", "serve.media"},
    "serve.jobs": {*GROUND, "serve.runtime", "serve.pipeline", "serve.media", "serve.jobs"},
    "serve.api": {*GROUND, "serve.runtime", "serve.pipeline", "serve.media", "serve.jobs", "serve.api"},
}
# the libraries a stage replica must not load: database, migrations, password hashing, JWTs, forms
SERVER_ONLY = ("sqlalchemy", "aiosqlite", "asyncpg", "alembic", "argon2", "jwt", "multipart")
STAGES = ("text_encoder", "transformer", "vae", "tts", "generator")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in ("serve", "deployments", "client", "loadtests")}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "serve" or len(parts) < 2:
        return None
    head = f"serve.{parts[1]}"
    return head if head in ALLOWED or head == "serve.ops" else None


def _allowed(imported: str, allowed: set[str]) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_is_below_it(layer):
    files = [SERVE / (layer.split(".")[1] + ".py")] if (SERVE / (layer.split(".")[1] + ".py")).exists() else \
        sorted((SERVE / layer.split(".")[1]).rglob("*.py"))
    assert files, layer
    bad = []
    for path in files:
        for imported in project_imports(path):
            if imported.split(".")[0] != "serve":
                bad.append(f"{module_name(path)} imports {imported} (outside the serve package)")
            elif layer_of(imported) is not None and not _allowed(imported, ALLOWED[layer]):
                bad.append(f"{module_name(path)} imports {imported}")
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_the_rule_checker_sees_a_violation(tmp_path):
    # the walk above must notice an upward import, wherever it sits in a module
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from serve.jobs.store import JobStore\n")
    assert "serve.jobs.store" in project_imports(fake)
    assert not _allowed("serve.jobs.store", ALLOWED["serve.pipeline"])


def test_a_stage_replica_loads_no_database_auth_or_http_server_code():
    code = (
        "import json, sys\n"
        + "".join(f"import deployments.{s}\n" for s in STAGES)
        + "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    bad = [m for m in loaded if m.split(".")[0] in SERVER_ONLY
           or m.startswith(("serve.api", "serve.jobs", "serve.ops"))]
    assert not bad, f"a stage replica would load: {bad}"
    assert "deployments.transformer" in loaded and "serve.pipeline.denoising" in loaded


# the two packages above serve's layers: a deployment wraps pipeline/media/jobs/api code for Serve;
# a client reaches a stack through the contracts and the cluster record. Neither imports serve.app,
# serve.ops (which build and drive them) or the other.
TOP = {
    "deployments": {*GROUND, "serve.runtime", "serve.pipeline", "serve.media", "serve.jobs", "serve.api",
                    "deployments"},
    "client": {*GROUND, "serve.runtime", "client"},
}


@pytest.mark.parametrize("package", sorted(TOP))
def test_deployments_and_client_import_only_what_is_below_them(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [f"{module_name(path)} imports {imported}"
           for path in files for imported in project_imports(path)
           if imported.split(".")[0] != "loadtests" and not _allowed(imported, TOP[package])]
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    files = [p for pkg in ("serve", "deployments", "client") for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        # `from a.b import c` names module a.b.c when c is a module, else a name in a.b
        graph[name] = {m for m in project_imports(path) if m in modules and m != name}
    return graph


def test_no_import_circles():
    graph = _module_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


# modules whose functions stay short enough to read in one screen (issue 20: resolve_spec was 93 lines)
SHORT_FUNCTIONS = {"serve/pipeline/spec.py": 60}


def long_functions(path: Path, limit: int) -> list[str]:
    """The functions (methods and nested ones too) of a file longer than `limit` lines, signature to last line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.name}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("rel", sorted(SHORT_FUNCTIONS))
def test_spec_resolution_is_made_of_short_functions(rel):
    assert not long_functions(ROOT / rel, SHORT_FUNCTIONS[rel])


def test_the_length_checker_sees_a_long_function(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n" + "    x = 1\n" * 60 + "\n\ndef g():\n    pass\n")
    assert long_functions(fake, 60) == ["m.py:1 f is 61 lines"]
