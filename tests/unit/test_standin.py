"""proxy/standin.py: the one in-process stand-in upstream, behind both demo mode and the stream doctor,
answered through the real SDK client, SSE parser, pump and encoders (no server, no socket)."""

from __future__ import annotations

import orjson

from proxy import create_app
from tests.unit.conftest import HELLO, bearer, unit_config


def ndjson(data: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def test_demo_mode_answers_through_the_stand_in() -> None:
    """RELAY_DEMO: POST /chat streams the demo model's words as NDJSON records, then the [DONE] record."""
    client = create_app(unit_config(demo=True, openai_api_key="")).test_client()
    records = ndjson(client.post("/chat", json=HELLO, headers=bearer()).data)
    assert records[-1]["content"] == "[DONE]" and records[-1]["done"] is True
    assert "".join(str(record["content"]) for record in records[:-1]).strip()


def test_doctor_streams_its_plan_through_the_same_stand_in() -> None:
    """GET /doctor: the planned records (rhythm, gap, after), each carrying its sequence number, then [DONE]."""
    client = create_app(unit_config()).test_client()
    response = client.get("/doctor?records=2&interval=0.05&gap=0&after=1", headers=bearer())
    records = ndjson(response.data)
    assert response.status_code == 200 and records[-1]["content"] == "[DONE]"
    sent = [orjson.loads(str(record["content"])) for record in records[:-1] if record["content"]]
    assert [(record["seq"], record["phase"]) for record in sent] == [(0, "rhythm"), (1, "rhythm"), (2, "after_gap")]
