"""The package's layers, checked: upper layers import lower ones, never the reverse, and a stage
replica loads no database, auth or HTTP-server code.

    serve.{config, errors, contracts}  <  serve.pipeline, serve.media  <  serve.jobs  <  serve.api  <  serve.ops
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

# what each layer may import from the project (besides the standard library and third parties)
ALLOWED = {
    "serve.config": set(),
    "serve.errors": set(),
    "serve.contracts": set(),
    "serve.pipeline": {"serve.config", "serve.errors", "serve.contracts", "serve.pipeline"},
    "serve.media": {"serve.config", "serve.errors", "serve.contracts", "serve.pipeline", "serve.media"},
    "serve.jobs": {"serve.config", "serve.errors", "serve.contracts", "serve.pipeline", "serve.media", "serve.jobs"},
    "serve.api": {"serve.config", "serve.errors", "serve.contracts", "serve.pipeline", "serve.media", "serve.jobs",
                  "serve.api"},
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
