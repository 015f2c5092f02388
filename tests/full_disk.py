"""A real full disk for a test: a small tmpfs of its own, mounted on a temp folder (the service's
data dir), that the test fills to the last page and empties again.

Mounting needs root (CAP_SYS_ADMIN); the tests run as root in CI. Without it the test is skipped
with the reason (an error under CINEVIVID_REQUIRE_ALL_TESTS=1). A file-size limit on the process
(RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG) is no stand-in here: the limit is per process and per file,
so the job database (SQLite, written by this same process, and already larger than any useful
limit) would meet it before the artifacts do, and it says EFBIG where a full disk says ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

from conftest import missing_tool

PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs hands out whole pages


class SmallDisk:
    """A mounted tmpfs at `path`. `fill()` takes every free page but `leave_bytes` (rounded up to
    pages) with a filler file outside the service's own files; `empty()` gives them back."""

    def __init__(self, path: Path):
        self.path = path
        self._filler = path / ".filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int = 0) -> None:
        keep = -(-leave_bytes // PAGE) * PAGE
        chunk = b"\0" * (1 << 20)
        with open(self._filler, "ab") as f:
            while (room := self.free_bytes() - keep) > 0:
                try:
                    f.write(chunk[:min(len(chunk), room)])
                    f.flush()
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        assert self.free_bytes() == keep, (self.free_bytes(), keep)

    def empty(self) -> None:
        self._filler.unlink(missing_ok=True)

    def files(self, folder: str = "") -> list[str]:
        """The names in `folder` of the disk (all of them, hidden ones too), sorted; the filler not."""
        return sorted(p.name for p in (self.path / folder).iterdir() if p != self._filler)


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int = 32 * 2**20):
    """Mount a tmpfs of `size_bytes` on `path` (created), yield a SmallDisk, unmount at the end."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "cinevivid-test-disk",
                            str(path)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        r = None
    if r is None or r.returncode != 0:
        why = "no `mount` command" if r is None else (r.stderr.strip() or f"exit status {r.returncode}")
        missing_tool(f"a real full disk needs a tmpfs mounted for the test, which needs root ({why}); a "
                     "file-size limit (RLIMIT_FSIZE) would hit the job database in this process first")
    try:
        yield SmallDisk(path)
    finally:
        # the service is closed by now; a file something still holds open makes it a lazy unmount
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
