"""A custom tool's free-form input, decoded while the model still writes it: pure, no I/O.

A custom tool reaches a chat upstream as a function taking `{"input": "<text>"}`, so its input arrives as
pieces of JSON. `CustomInputDecoder.feed` takes each piece and gives the text decoded so far that was not
given yet, so the stream can send `response.custom_tool_call_input.delta` events as OpenAI does. An escape
split between pieces (`\\`, `\\u00`, half of a surrogate pair) waits for the rest. Arguments of another shape
(another key first, not a string, a lone surrogate) stop the decoding; the stream then sends what was not
given out yet whole, at the end, unless some was given out already (the `.done` event has it all).
"""

from __future__ import annotations

import json
import re

# The arguments' start up to the input string's opening quote; and every prefix of it, to tell "not yet"
# from "never".
_OPENING = re.compile(r'\s*\{\s*"input"\s*:\s*"')
_PARTIAL_OPENING = re.compile(r'\s*(?:\{\s*(?:"(?:i(?:n(?:p(?:u(?:t(?:"\s*(?::\s*)?)?)?)?)?)?)?)?)?')
_PLAIN = re.compile(r'[^"\\]+')
_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
_PARTIAL_ESCAPE = re.compile(r'\\(?:u[0-9a-fA-F]{0,3})?')  # an escape cut short by the piece's end
_HIGH_SURROGATE = re.compile(r'\\u[dD][89abAB][0-9a-fA-F]{2}')


class CustomInputDecoder:
    def __init__(self) -> None:
        self.raw = ""
        self.position = 0  # how far into `raw` the input string has been decoded
        self.state = "opening"  # then "string", and "done" at the closing quote or "stopped" on a surprise
        self.emitted = 0  # characters given out

    def feed(self, piece: str) -> str:
        """The input text `piece` completes, beyond what earlier pieces gave."""
        self.raw += piece
        if self.state == "opening":
            match = _OPENING.match(self.raw)
            if match is None:
                if not _PARTIAL_OPENING.fullmatch(self.raw):
                    self.state = "stopped"
                return ""
            self.state, self.position = "string", match.end()
        if self.state != "string":
            return ""
        text = self._decode()
        self.emitted += len(text)
        return text

    def _decode(self) -> str:
        out: list[str] = []
        raw = self.raw
        while self.position < len(raw):
            plain = _PLAIN.match(raw, self.position)
            if plain is not None:
                out.append(plain.group())
                self.position = plain.end()
                continue
            if raw[self.position] == '"':
                self.state = "done"
                break
            escape = self._escape()
            if escape is None:
                break  # incomplete (or broken: then the end sends the input whole)
            out.append(escape)
        return "".join(out)

    def _escape(self) -> str | None:
        """The escape at `position` decoded (a surrogate pair whole), or None while it is incomplete."""
        escape = _ESCAPE.match(self.raw, self.position)
        if escape is None:
            if not _PARTIAL_ESCAPE.fullmatch(self.raw, self.position):
                self.state = "stopped"
            return None
        end = escape.end()
        if _HIGH_SURROGATE.fullmatch(escape.group()):
            low = _ESCAPE.match(self.raw, end)
            if low is None and len(self.raw) - end < 6:
                return None
            end = low.end() if low is not None else end
        text: str = json.loads(f'"{self.raw[self.position:end]}"')
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate: no text a client could be sent
            self.state = "stopped"
            return None
        self.position = end
        return text
