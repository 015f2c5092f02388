"""loadtests/carry_ray.py, the CPU side: pack splits into parts no bigger than asked with a manifest,
the size check refuses what a call could not carry, the device side reassembles byte for byte and
refuses a missing or corrupt part; the pip commands target the device's Python (cp312 manylinux) and
install with --no-index. Nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest

from loadtests import carry_ray


@pytest.fixture
def wheels(tmp_path):
    src = tmp_path / "wheels"
    src.mkdir()
    (src / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl").write_bytes(os.urandom(5000))
    (src / "click-8.1.0-py3-none-any.whl").write_bytes(os.urandom(1234))
    return src


@pytest.mark.fast
def test_pack_split_check_and_reassemble_round_trip(wheels, tmp_path, capsys):
    out = tmp_path / "carry" / "ray"
    m = carry_ray.pack(wheels, out, part_bytes=2048, call_limit=4096, ray_version="2.60.0")
    assert len(m["parts"]) >= 3 and all(p["bytes"] <= 2048 for p in m["parts"])
    assert sum(p["bytes"] for p in m["parts"]) == m["tar_bytes"] and m["ray_version"] == "2.60.0"
    assert sorted(m["files"]) == sorted(f.name for f in wheels.iterdir())
    plan = carry_ray.plan(out)
    assert len(plan) == len(m["parts"]) and all(c[0].endswith("manifest.json") for c in plan)

    # the device side, on a copy that received the parts one call at a time
    dest = tmp_path / "unpacked"
    files = carry_ray.reassemble(out, dest)
    for f in files:
        assert f.read_bytes() == (wheels / f.name).read_bytes()
    assert carry_ray.main(["install", "--dir", str(out), "--dest", str(tmp_path / "again"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "pip install --no-index --find-links" in printed and "ray[serve]==2.60.0" in printed


@pytest.mark.fast
def test_size_check_and_refusals(wheels, tmp_path):
    with pytest.raises(ValueError, match="over the 4096 bytes a call carries"):
        carry_ray.pack(wheels, tmp_path / "big", part_bytes=8192, call_limit=4096)
    out = tmp_path / "ray"
    m = carry_ray.pack(wheels, out, part_bytes=2048, call_limit=4096)
    # a part that did not arrive yet
    last = out / m["parts"][-1]["name"]
    data = last.read_bytes()
    last.unlink()
    with pytest.raises(FileNotFoundError, match=m["parts"][-1]["name"]):
        carry_ray.reassemble(out, tmp_path / "u1")
    # one carried truncated
    last.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="corrupt"):
        carry_ray.reassemble(out, tmp_path / "u2")
    with pytest.raises(ValueError, match="the manifest says"):
        carry_ray.check_sizes(out, 4096)
    last.write_bytes(data)
    carry_ray.check_sizes(out, 4096)
    with pytest.raises(ValueError, match="over the 2100 bytes"):
        carry_ray.check_sizes(out, 2100)  # a 2048-byte part + the manifest


@pytest.mark.fast
def test_download_targets_the_devices_python(capsys, tmp_path):
    cmd = carry_ray.download_command(tmp_path, "2.60.0")
    assert cmd[1:4] == ["-m", "pip", "download"] and "ray[serve]==2.60.0" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--platform") + 1] == "manylinux2014_x86_64" and "manylinux_2_17_x86_64" in cmd
    assert carry_ray.main(["download", "--wheels", str(tmp_path / "w"), "--dry-run"]) == 0
    assert f"ray[serve]=={carry_ray.installed_ray_version()}" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()  # a dry run downloads nothing
