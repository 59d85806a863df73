"""What a sweep or a search keeps on disk: append-only JSON lines that survive a crash, a lock
per output, the settings a folder was made with, and a cheap fingerprint of a model's files.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with OutputLock(folder / ".lock", "a sweep"):
    ...     append_jsonl(folder / "r.jsonl", {"a": 1})
    >>> read_jsonl(folder / "r.jsonl")
    [{'a': 1}]
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

from vtc.errors import VtcError


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append ``row`` as one line, in one write, flushed to disk (a crash cuts at most this line).

    Example:
        >>> append_jsonl("/tmp/vtc-doctest.jsonl", {"x": 1})  # doctest: +SKIP
    """
    data = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_jsonl(path: str | Path) -> str | None:
    """Drop a cut-off last line (no final newline, or not JSON), so the next append starts on a
    fresh line; returns the dropped text, or None when the file was whole (or absent).

    Example:
        >>> p = Path("/tmp/vtc-doctest-torn.jsonl"); _ = p.write_text('{"a": 1}\\n{"b": ')
        >>> repair_jsonl(p), p.read_text()
        ('{"b": ', '{"a": 1}\\n')
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data:
        return None
    whole = data.endswith(b"\n")
    body, _, last = (data[:-1] if whole else data).rpartition(b"\n")
    if whole:
        try:
            json.loads(last)
            return None
        except ValueError:
            pass
    keep = body + b"\n" if body else b""
    with path.open("r+b") as f:
        f.truncate(len(keep))
    return last.decode(errors="replace")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (lines that do not parse are left out; absent file: none).

    Example:
        >>> read_jsonl("/nonexistent/results.jsonl")
        []
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class OutputLock:
    """An exclusive lock file for one output: a second run into it refuses at once; a lock left
    by a process that no longer runs (on this machine) is taken over.

    Example:
        >>> with OutputLock("/tmp/vtc-doctest.lock", "a sweep into /tmp"):  # doctest: +SKIP
        ...     ...
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path, self.what, self.held = Path(path), what, False

    def _claim(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return True

    def acquire(self) -> OutputLock:
        for _ in range(3):
            if self._claim():
                self.held = True
                return self
            try:
                owner = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and (host != socket.gethostname() or _alive(pid)):
                where = f"pid {pid}" + (f" on {host}" if host != socket.gethostname() else "")
                raise VtcError(f"{self.what} is already running ({where}, lock {self.path}): wait for it to "
                               f"finish or pass another --out")
            self.path.unlink(missing_ok=True)  # its process is gone: take the lock over
        raise VtcError(f"could not take the lock {self.path}: remove it if no run is using it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(folder: str | Path, flag: str = "--out") -> None:
    """Refuse (one line) a folder that cannot be created or written, before any work starts.

    Example:
        >>> check_writable("/proc/vtc")
        Traceback (most recent call last):
        ...
        vtc.errors.VtcError: cannot write to /proc/vtc (...): pass a writable --out
    """
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise VtcError(f"cannot write to {folder} ({existing} is a file): pass a writable {flag}")
    try:  # a real write: permission bits say nothing to root or on a read-only mount
        with tempfile.TemporaryFile(dir=existing):
            pass
        for name in ("results.jsonl", "settings.json"):
            if (folder / name).exists():
                os.close(os.open(folder / name, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        raise VtcError(f"cannot write to {folder} ({e.strerror or e}): pass a writable {flag}") from None


def check_out_file(out: str | Path, what: str, example: str) -> None:
    """Refuse (one line) an output file that names a folder, or whose folder cannot be written.

    Example:
        >>> check_out_file("/tmp", "schedule file", "schedule.json")
        Traceback (most recent call last):
        ...
        vtc.errors.VtcError: --out /tmp is a folder: name the schedule file, e.g. /tmp/schedule.json
    """
    out = Path(out)
    if out.is_dir():
        raise VtcError(f"--out {out} is a folder: name the {what}, e.g. {out / example}")
    check_writable(out.parent)


def model_fingerprint(path: str) -> str | None:
    """A cheap content fingerprint of a local model folder (its config and the sizes, heads and
    tails of its weight files), so that retrained weights at the same path are told apart; None
    for a hub id.

    Example:
        >>> model_fingerprint("org/not-a-local-folder") is None
        True
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    digest = hashlib.sha1()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt"):
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with file.open("rb") as f:
                digest.update(f.read(1 << 16))
                f.seek(max(0, size - (1 << 16)))
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]
