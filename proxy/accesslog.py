"""One access-log line per request, written when the response is finished (streams included).

Never a key: the Authorization header is not logged and a `key` query parameter is redacted.
One request, one line: the text format writes each field as `name=value`, the value bare when it is printable
ASCII without spaces or quotes and otherwise as a double-quoted JSON string (`model="a b\\n"`), so neither a
percent-encoded newline in the path nor one in a `model` can start a line of its own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO
from urllib.parse import parse_qsl, urlencode

import orjson

if TYPE_CHECKING:  # the log reads a stream's account; it has no business importing the stream's machinery
    from proxy.pump import StreamStats

log = logging.getLogger("relay.access")
# The relay's text log format (proxy/__init__.py configure_logging); DirectWriter writes exactly this.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
SECRET_PARAMS = frozenset({"key", "api_key", "access_key", "token"})
# A value written without quotes: printable ASCII except space, '"' and '\\' (what quoting would escape).
_BARE = re.compile(r'[!#-\[\]-~]+')
_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Conversation text in a URL (`GET /chat?prompt=...`): logged only as the `prompt` field with LOG_CONTENT=1.
CONTENT_PARAMS = frozenset({"prompt"})


@dataclass
class AccessRecord:
    method: str
    path: str
    client: str
    request_id: str
    started: float
    status: int = 0
    key_name: str = "-"
    model: str = "-"
    stats: StreamStats | None = None
    prompt: str | None = None  # only with LOG_CONTENT=1
    bridge: str | None = None  # a translated request: "<client protocol>-><upstream protocol>"
    dropped_tools: tuple[str, ...] = ()  # built-in tools a bridge left out of the upstream request
    ended: float | None = None  # when the request closed (monotonic); its line may be written later

    def duration(self) -> float:
        """Seconds from the request's start to its close (to now while it is open)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def fields(self) -> list[tuple[str, object]]:
        fields: list[tuple[str, object]] = [
            ("method", self.method), ("path", self.path), ("status", self.status),
            ("duration_ms", _ms(self.duration())), ("model", self.model),
            ("key", self.key_name), ("client", self.client), ("request_id", self.request_id),
        ]
        stats = self.stats
        if stats is not None:
            ttft = _ms(stats.first_token_at - self.started) if stats.first_token_at is not None else None
            fields += [("ttft_ms", ttft), ("tokens", stats.tokens), ("upstream", stats.upstream or "-"),
                       ("fallbacks", stats.fallbacks), ("outcome", stats.outcome)]
            if stats.keep_content:
                fields.append(("answer", "".join(stats.content)))
        if self.bridge is not None:
            fields.append(("bridge", self.bridge))
        if self.dropped_tools:
            fields.append(("dropped_tools", ",".join(self.dropped_tools)))
        if self.prompt is not None:
            fields.append(("prompt", self.prompt))
        return fields

    def line(self) -> str:
        return " ".join(f"{name}={_text(value)}" for name, value in self.fields())

    def write(self) -> None:
        writer = _direct
        if writer is not None and writer.usable():
            writer.write(self.line())
            return
        # The fields ride along for LOG_FORMAT=json, where JsonLogFormatter writes them as an object.
        log.info(self.line(), extra={"access_fields": dict(self.fields())})


class DirectWriter:
    """The access line written straight to the relay's text handler, as its formatter and RedactingFilter would
    write it (the same bytes), without a LogRecord, the filter and formatter calls and the logging module's
    locks per request: a tenth of the relay's own CPU per request went there (docs/benchmarks.md). It applies
    only while the loggers are as `configure_logging` left them; any other handler (a test's, an operator's)
    or level gets the ordinary logging path."""

    def __init__(self, handler: logging.StreamHandler[TextIO], redact: Callable[[str], str],
                 escape: Callable[[str], str]) -> None:
        self.handler = handler
        self.redact = redact
        self.escape = escape
        self.relay_logger = logging.getLogger("relay")
        self._filters = list(handler.filters)
        self._formatter = handler.formatter
        self._second = -1
        self._second_text = ""

    def usable(self) -> bool:
        relay, handler = self.relay_logger, self.handler
        return (not log.handlers and not log.filters and log.propagate and not log.disabled
                and log.isEnabledFor(logging.INFO) and relay.handlers == [handler] and not relay.filters
                and handler.level <= logging.INFO and handler.filters == self._filters
                and handler.formatter is self._formatter)

    def write(self, line: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # logging.Formatter.formatTime: local time, then milliseconds
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        text = (f"{self._second_text},{int((now - second) * 1000):03d} INFO relay.access "
                f"{self.escape(self.redact(line))}{self.handler.terminator}")
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.stream.flush()
        except (OSError, ValueError):
            handler.handleError(logging.LogRecord(log.name, logging.INFO, __file__, 0, line, None, None))
        finally:
            handler.release()


_direct: DirectWriter | None = None


def write_directly(writer: DirectWriter | None) -> None:
    """Set (or, with None, drop) the direct writer; `configure_logging` calls it for the text format."""
    global _direct
    _direct = writer


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: every log line one JSON object; access lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "access_fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["traceback"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def redacted_path(path: str, query: str) -> str:
    """The path with any secret-looking query parameter replaced, so keys in URLs never reach the log, and
    conversation text (`prompt`) replaced by its length, so conversations stay out of it too."""
    if not query:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    cleaned = [(name, _redacted(name.lower(), value)) for name, value in pairs]
    return f"{path}?{urlencode(cleaned)}"


def _redacted(name: str, value: str) -> str:
    if name in SECRET_PARAMS:
        return "[redacted]"
    if name in CONTENT_PARAMS:
        return f"[{len(value)} chars]"
    return value


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return quoted(str(value))


def quoted(text: str) -> str:
    """`text` bare when nothing in it could split or confuse the line, else a JSON string literal (non-ASCII
    letters kept readable; quotes, backslashes and every control or line-separator character escaped)."""
    if _BARE.fullmatch(text):
        return text
    return '"' + _ESCAPED.sub(lambda match: _ESCAPES.get(match.group(), f"\\u{ord(match.group()):04x}"), text) + '"'
