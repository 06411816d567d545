"""Each model's worker output: a bounded ring of its last lines, a size-rotated file, live followers.

``Worker._read`` (supervisor.py) is the one reader of a worker's stdout and stderr; it hands every
line to its model's ``ModelLog``, which keeps it in the ring (the worker's ``log_tail`` for errors and
``GET /logs/{model}`` both read it), appends it to ``<log_dir>/<model>.log`` (the stdlib's
RotatingFileHandler: ``limits.log_file_bytes``, 3 old files kept) and passes it to every follower
(``?follow=true``). The same line goes to all three in one call, so none has a line another lacks.
No HTTP here.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
from collections import deque
from pathlib import Path

from proxy.events import Feed

log = logging.getLogger("proxy.modellogs")

RING_LINES = 1000  # lines kept per model in memory
MAX_LINE = 4000  # characters kept of one line (a worker that prints a huge line cannot take memory)
BACKUPS = 3  # rotated files kept beside the current one
FOLLOW_LINES = 1000  # lines a follower may fall behind by before it loses the oldest


def file_name(model: str) -> str:
    """A file name for a model that stays inside the log dir whatever the name holds (``/``, ``..``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).lstrip(".")
    return f"{safe or '_'}.log"


class ModelLog:
    def __init__(self, model: str, path: Path | None, max_bytes: int, lines: int = RING_LINES) -> None:
        self.model = model
        self.path = path
        self._ring: deque[str] = deque(maxlen=lines)
        self.count = 0  # lines appended so far (a worker's tail starts at the count when it started)
        self._followers: list[Feed[str]] = []
        self._file: logging.handlers.RotatingFileHandler | None = None
        self._max_bytes = max_bytes

    def _handler(self) -> logging.handlers.RotatingFileHandler | None:
        if self._file is None and self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = logging.handlers.RotatingFileHandler(
                    self.path, maxBytes=self._max_bytes, backupCount=BACKUPS, encoding="utf-8", delay=True
                )
            except OSError as exc:
                log.warning("model %s: cannot write its log file %s: %s", self.model, self.path, exc)
                self.path = None
                return None
            self._file.setFormatter(logging.Formatter("%(message)s"))
        return self._file

    def append(self, line: str) -> None:
        line = line[:MAX_LINE]
        self._ring.append(line)
        self.count += 1
        handler = self._handler()
        if handler is not None:
            handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "name": self.model}))
        for feed in self._followers:
            feed.put(line)

    def tail(self, lines: int, since: int = 0) -> list[str]:
        """The last ``lines`` lines, only those appended after ``since`` lines had been."""
        fresh = min(len(self._ring), max(0, self.count - since))
        n = min(fresh, max(0, lines))
        if n == 0:
            return []
        ring = self._ring
        return [ring[i] for i in range(len(ring) - n, len(ring))]

    def follow(self, size: int = FOLLOW_LINES) -> Feed[str]:
        """A bounded feed of the lines from now on; ``close()`` it when done."""
        feed: Feed[str] = Feed(size, on_close=self._followers.remove)
        self._followers.append(feed)
        return feed

    @property
    def followers(self) -> int:
        return len(self._followers)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LogBook:
    """Every model's ``ModelLog``, made on first use. ``log_dir`` None: rings only, no files."""

    def __init__(self, log_dir: Path | None, max_bytes: int) -> None:
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self._logs: dict[str, ModelLog] = {}

    def model(self, name: str) -> ModelLog:
        found = self._logs.get(name)
        if found is None:
            path = self.log_dir / file_name(name) if self.log_dir is not None else None
            found = self._logs[name] = ModelLog(name, path, self.max_bytes)
        return found

    def followers(self) -> dict[str, int]:
        """How many follow each model's log now (models nobody follows left out)."""
        return {name: log.followers for name, log in self._logs.items() if log.followers}

    def close(self) -> None:
        for model_log in self._logs.values():
            model_log.close()
