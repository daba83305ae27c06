"""A custom tool's input decoded from its `{"input": ...}` wrapper as the pieces arrive
(proxy/bridge/responses_custom_input.py)."""

from __future__ import annotations

import pytest

from proxy.bridge.responses_custom_input import CustomInputDecoder


@pytest.mark.parametrize(("pieces", "given", "state"), [
    (['{"input":"abc"}'], ["abc"], "done"),
    (['{"in', 'put": "a', 'bc', '"}'], ["", "a", "bc", ""], "done"),
    ([' {\n  "input" :\t"x'], ["x"], "string"),
    (['{"input":"a\\', 'nb"}'], ["a", "\nb"], "done"),
    (['{"input":"\\u00', 'e9!"}'], ["", "é!"], "done"),
    (['{"input":"\\ud83d', '\\ude00"}'], ["", "\U0001f600"], "done"),
    (['{"input":"say \\"hi\\"', '"}'], ['say "hi"', ""], "done"),
    (['{"patch":"x"}'], [""], "stopped"),
    (['["input"]'], [""], "stopped"),
    (['{"input":"a\\q"}'], ["a"], "stopped"),
    (['{"input":"\\ud83d\\u0041"}'], [""], "stopped"),
], ids=["whole", "split-key", "whitespace", "split-escape", "split-unicode", "surrogate-pair", "quotes",
        "other-key", "not-an-object", "bad-escape", "lone-surrogate"])
def test_decoding(pieces: list[str], given: list[str], state: str) -> None:
    """Each piece gives the text it completes; split escapes wait; another shape stops the decoding."""
    decoder = CustomInputDecoder()
    assert [decoder.feed(piece) for piece in pieces] == given
    assert decoder.state == state and decoder.emitted == len("".join(given))
