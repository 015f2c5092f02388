"""`make setup TORCH=...`: make the installed torch the one TORCH asks for, or say loudly that it
is not. Run after the venv's install on every `make setup` (`make run`, `make test`), cheaply:
it reads the installed torch's metadata and version file, without importing torch.

    python -m serve.ops.torch_setup torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

What counts: the version (TORCH's specifier) and the build, from a local label (`+cu128`, `+cpu`)
or the index URL's last part (`.../whl/cu128`): a CUDA build of that CUDA version, or a CPU build.
When they differ, torch is uninstalled and TORCH installed; if the result still differs (pip found
no such wheel), it says so in a banner and exits 1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

BUILD = re.compile(r"^(cpu|cu\d+|rocm[\d.]+)$")


def wanted(argv: list[str]) -> tuple[Requirement, str | None]:
    """TORCH's requirement and the build it asks for (cpu, cu128, ...; None: any)."""
    req, build, args = None, None, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--index-url", "--extra-index-url", "-i") and args:
            tail = args.pop(0).rstrip("/").rsplit("/", 1)[-1]
            build = tail if BUILD.match(tail) else build
        elif not arg.startswith("-") and req is None:
            req = Requirement(arg)
    if req is None:
        raise SystemExit(f"TORCH={' '.join(argv)!r} names no torch requirement")
    for spec in req.specifier:
        local = Version(spec.version.replace("*", "0")).local if "+" in spec.version else None
        build = local or build
    return req, build


def installed() -> tuple[str, str | None] | None:
    """(version, CUDA version or None) of the installed torch, or None."""
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return None
    cuda = None
    try:
        text = dist.locate_file("torch/version.py").read_text()
        found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        cuda = found.group(1) if found else None
    except OSError:
        pass
    return dist.version, cuda


def satisfied(req: Requirement, build: str | None, have: tuple[str, str | None] | None) -> bool:
    if have is None:
        return False
    version, cuda = have
    base = Version(version)
    if not req.specifier.contains(Version(base.public), prereleases=True) \
            and not req.specifier.contains(base, prereleases=True):
        return False
    if build == "cpu":
        return cuda is None
    if build and build.startswith("cu"):
        return cuda is not None and cuda.replace(".", "") == build[2:]
    return True


def describe(have: tuple[str, str | None] | None) -> str:
    if have is None:
        return "no torch"
    return f"torch {have[0]} ({f'CUDA {have[1]}' if have[1] else 'no CUDA'})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    req, build = wanted(argv)
    have = installed()
    if satisfied(req, build, have):
        return 0
    print(f"TORCH asks for {' '.join(argv)}; installed: {describe(have)}. Installing it.", file=sys.stderr)
    pip = [sys.executable, "-m", "pip", "--quiet"]
    if have is not None:
        subprocess.run([*pip, "uninstall", "-y", "torch"], check=False)
    subprocess.run([*pip, "install", *argv], check=False)
    have = installed()
    if satisfied(req, build, have):
        print(f"installed {describe(have)}", file=sys.stderr)
        return 0
    banner = "!" * 78
    print(f"{banner}\nNOT DONE: TORCH asks for {' '.join(argv)} but {describe(have)} is installed.\n"
          f"Check the wheel exists for this Python and platform, then run `make setup TORCH=...` again.\n{banner}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
