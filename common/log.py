"""Structured logging: one event per line as `key=value` pairs, ids on every line, never a secret.

Call `setup(process="hostd", **ids)` once at start; log with `log.info("event", extra={"instance": id})`
or through `bind(logger, instance=id)`. Keys named like secrets are masked wherever they appear.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

_SECRET_KEYS = re.compile(r"(password|passwd|secret|token|private|key_pem|authorization)", re.I)
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}


def _fmt_value(key: str, value: Any) -> str:
    if _SECRET_KEYS.search(key):
        return "***"
    text = str(value)
    if not text or any(c in text for c in ' ="'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def __init__(self, process: str, static: dict[str, str]) -> None:
        super().__init__()
        self.process = process
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"proc={self.process}",
                 f"logger={record.name}", f"event={_fmt_value('event', record.getMessage())}"]
        for k, v in self.static.items():
            parts.append(f"{k}={_fmt_value(k, v)}")
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                parts.append(f"{k}={_fmt_value(k, v)}")
        if record.exc_info:
            parts.append(f"exc={_fmt_value('exc', self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(process: str, level: str = "INFO", **static: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(process, static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class bind(logging.LoggerAdapter[logging.Logger]):  # noqa: N801 - reads as a verb at call sites
    """A logger that adds fixed ids (instance=…, task=…) to every line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs
