"""The node's memory of image checks: (location, byte size, modification time) -> verdict, in one sqlite file.

``images.scan`` asks it before reading a file: a file whose size and mtime are
what they were at its last check keeps its verdict (ok, or the reason it is
broken); a new or changed file is read and decoded again, and its new verdict
replaces the old one. Verdicts of an older checker (``version``) do not count.

sqlite does the locking: two processes scanning at once each commit in short
transactions and wait (``busy timeout``) for each other, and a scan killed
half-way keeps the verdicts of the chunks it committed. The file must be on a
local disk (as the node cache is): sqlite's locks are not safe over NFS. The file is a cache:
one that sqlite cannot read is deleted and started afresh.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time

FILE_NAME = "image_checks.sqlite"
_BATCH = 500  # locations per SELECT ... IN (...): well under sqlite's variable limit
_TIMEOUT_S = 600  # how long a process waits for another one's lock before it gives up

Identity = tuple[int, int]  # (size in bytes, mtime in ns)


class CheckCache:
    """Verdicts of one checker ``version`` kept under ``cache_dir``."""

    def __init__(self, cache_dir: str, version: int):
        os.makedirs(cache_dir, exist_ok=True)
        self.path = os.path.join(cache_dir, FILE_NAME)
        self.version = version
        try:
            self.db = self._open()
        except sqlite3.OperationalError:  # locked for ten minutes, a read-only disk: not ours to delete
            raise
        except sqlite3.DatabaseError:  # not a database (a torn copy, a stray file): it only cached work
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path + suffix)
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        # Switching a new file to WAL can answer "database is locked" at once,
        # without sqlite's busy handler, while another process is switching it
        # too (CI saw it with two scans started together): retry until the timeout.
        deadline = time.monotonic() + _TIMEOUT_S
        while True:
            db = sqlite3.connect(self.path, timeout=_TIMEOUT_S)
            try:
                self._set_up(db)
                return db
            except sqlite3.OperationalError as e:
                db.close()
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _set_up(db: sqlite3.Connection) -> None:
        # WAL + NORMAL: a commit appends to the log without an fsync (one at each
        # checkpoint), so a scan does not wait on the disk behind other writers;
        # a power cut can lose the last commits, never corrupt the file.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS checks (location TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                       "mtime_ns INTEGER NOT NULL, version INTEGER NOT NULL, reason TEXT) WITHOUT ROWID")

    def known(self, locations: list[str], identities: list[Identity | None]) -> dict[int, str | None]:
        """{index: reason, None for ok} for every location whose identity matches its stored verdict."""
        want = {loc: (i, ident) for i, (loc, ident) in enumerate(zip(locations, identities)) if ident is not None}
        names = list(want)
        out = {}
        for start in range(0, len(names), _BATCH):
            part = names[start:start + _BATCH]
            rows = self.db.execute(
                f"SELECT location, size, mtime_ns, version, reason FROM checks WHERE location IN "
                f"({','.join('?' * len(part))})", part)
            for loc, size, mtime_ns, version, reason in rows:
                i, ident = want[loc]
                if (size, mtime_ns) == ident and version == self.version:
                    out[i] = reason
        return out

    def record(self, rows: list[tuple[str, Identity, str | None]]) -> None:
        """Store (location, identity, reason or None) rows in one transaction."""
        if not rows:
            return
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?)",
                                [(loc, size, mtime_ns, self.version, reason)
                                 for loc, (size, mtime_ns), reason in rows])

    def close(self) -> None:
        self.db.close()
