"""Artifact storage under the data dir: `videos/<job id>.mp4` and `.jpg`, written to a temp
name and renamed, so a reader never sees half a file and a crash leaves no partial artifact.

A diffusion-forcing job also has a preview while it runs: `videos/<job id>.preview.mp4`, a
fragmented MP4 that only grows (each window's fragments appended), and `.preview.json`, replaced
atomically after each append, saying how many bytes of it are whole fragments and how many windows
are done. A reader serves that many bytes, so it never sees half a fragment. Both go when the job
ends (the final MP4 replaces the preview).

A job that starts from an image or a video keeps what it starts from under `inputs/<job id>/`
(`image.png`, `last_image.png`: the checked image fitted to the job's size, lossless; `source.mp4`:
the video to extend, a hard link to the service's own file when it is one, so deleting that video
does not take it away), written before the job is queued and removed when the job ends."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from pathlib import Path


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.videos = self.root / "videos"

    def ensure(self) -> None:
        """The data dir (mode 700 when this user owns it: videos, inputs and the database are the
        users' own) and its videos/ folder."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_uid == os.geteuid() and self.root.stat().st_mode & 0o077:
            os.chmod(self.root, 0o700)
        self.videos.mkdir(parents=True, exist_ok=True)

    # ---- a job's inputs ----
    INPUT_FILES = ("image.png", "last_image.png", "source.mp4")

    def inputs_dir(self, job_id: str) -> Path:
        return self.root / "inputs" / job_id

    async def save_inputs(self, job_id: str, files: dict[str, bytes | Path]) -> None:
        """Write a job's inputs (name -> bytes, or a Path to link or copy); all or nothing."""
        folder = self.inputs_dir(job_id)

        def _save() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                for name, data in files.items():
                    if name not in self.INPUT_FILES:
                        raise ValueError(f"not an input file name: {name}")
                    if isinstance(data, Path):
                        try:
                            os.link(data, folder / name)
                        except OSError:  # another file system, or no hard links: a copy
                            tmp = folder / f".{name}.tmp"
                            shutil.copyfile(data, tmp)
                            os.replace(tmp, folder / name)
                    else:
                        self._write_atomic(folder / name, data)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        await asyncio.to_thread(_save)

    async def load_inputs(self, job_id: str) -> dict[str, bytes]:
        """The job's input files that exist, name -> bytes."""
        folder = self.inputs_dir(job_id)

        def _load() -> dict[str, bytes]:
            return {name: (folder / name).read_bytes() for name in self.INPUT_FILES if (folder / name).exists()}
        return await asyncio.to_thread(_load)

    async def delete_inputs(self, job_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.inputs_dir(job_id), True)

    def paths(self, job_id: str) -> tuple[Path, Path]:
        return self.videos / f"{job_id}.mp4", self.videos / f"{job_id}.jpg"

    def preview_paths(self, job_id: str) -> tuple[Path, Path]:
        return self.videos / f"{job_id}.preview.mp4", self.videos / f"{job_id}.preview.json"

    async def append_preview(self, job_id: str, fragment: bytes, **state) -> dict:
        """Append whole fragments to the job's preview, then publish its new length with `state`
        (windows_done, windows_total, playable_s)."""
        video, meta = self.preview_paths(job_id)

        def _append() -> dict:
            self.ensure()
            with open(video, "ab") as f:
                f.write(fragment)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            info = {"bytes": size, **state}
            self._write_atomic(meta, json.dumps(info).encode())
            return info
        return await asyncio.to_thread(_append)

    def preview_state(self, job_id: str) -> dict | None:
        """The published state of the job's preview (bytes, windows_done, windows_total,
        playable_s), or None when it has none (not a DF job, no window yet, or it has ended)."""
        try:
            return json.loads(self.preview_paths(job_id)[1].read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    async def delete_preview(self, job_id: str) -> None:
        await self.delete(*(str(p) for p in self.preview_paths(job_id)))

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    async def save(self, job_id: str, mp4: bytes, thumbnail: bytes) -> tuple[str, str]:
        video, thumb = self.paths(job_id)

        def _save():
            self.ensure()
            try:
                self._write_atomic(video, mp4)
                self._write_atomic(thumb, thumbnail)
            except BaseException:  # e.g. the disk filled up between the two: keep neither
                video.unlink(missing_ok=True)
                thumb.unlink(missing_ok=True)
                raise
        await asyncio.to_thread(_save)
        return str(video), str(thumb)

    async def delete(self, *paths: str | None) -> None:
        def _delete():
            for p in paths:
                if p:
                    Path(p).unlink(missing_ok=True)
        await asyncio.to_thread(_delete)

    def check_writable(self, *extra: Path) -> dict:
        """Write and remove a probe file in videos/, inputs/ and each of `extra` (the database's
        folder); an OSError names the folder that failed."""
        self.ensure()
        for folder in (self.videos, self.root / "inputs", *extra):
            probe = Path(folder) / f".probe.{secrets.token_hex(4)}"
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"ok")
            except OSError as exc:
                raise OSError(exc.errno, f"{folder} is not writable: {exc.strerror}") from None
            finally:  # on a full disk the file is made and the write fails: leave nothing either way
                probe.unlink(missing_ok=True)
        usage = shutil.disk_usage(self.root)
        return {"free_bytes": usage.free, "total_bytes": usage.total}
