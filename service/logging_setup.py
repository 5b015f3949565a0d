"""Structured JSON logs: one object a line; ``extra={...}`` fields are merged in."""
from __future__ import annotations

import json
import logging
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict | None = None):
        super().__init__()
        self.static = static or {}  # fields every line carries (the replica's name)

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
               **self.static}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", replica: str = "") -> None:
    root = logging.getLogger("tta")
    formatter = JsonFormatter({"replica": replica} if replica else None)
    handlers = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    for h in handlers:
        h.setFormatter(formatter)
    if not handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())
