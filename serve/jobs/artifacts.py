"""Artifact storage under the data dir: `videos/<job id>.mp4` and `.jpg`, written to a temp
name and renamed, so a reader never sees half a file and a crash leaves no partial artifact."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.videos = self.root / "videos"

    def ensure(self) -> None:
        self.videos.mkdir(parents=True, exist_ok=True)

    def paths(self, job_id: str) -> tuple[Path, Path]:
        return self.videos / f"{job_id}.mp4", self.videos / f"{job_id}.jpg"

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

    def check_writable(self) -> dict:
        self.ensure()
        probe = self.root / f".probe.{secrets.token_hex(4)}"
        probe.write_bytes(b"ok")
        probe.unlink()
        usage = shutil.disk_usage(self.root)
        return {"free_bytes": usage.free, "total_bytes": usage.total}
