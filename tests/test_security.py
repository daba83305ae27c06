"""Security: keys never leak (logs, bodies, headers, upstream), access is checked alike for every wrong key,
security headers and request IDs on every response, and no client can steer the upstream or read settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx2
import pytest

from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, SECRETS, UPSTREAM_KEY, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.hardening import FAULT_SETTINGS, STREAM_ENDPOINTS, StreamEndpoint, assert_no_secrets, fake_says
from tests.servers import wait_until

AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def secure_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(**FAULT_SETTINGS)


@pytest.fixture(scope="module")
def client(secure_relay: RelayProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=secure_relay.url, timeout=20) as http:
        yield http


def every_kind_of_response(client: httpx2.Client) -> list[httpx2.Response]:
    """One response of each kind the relay gives: streams, every error class, preflights, docs, health."""
    requests: list[tuple[str, str, dict]] = [
        ("GET", "/healthz", {}),
        ("GET", "/", {}),
        ("GET", "/openapi.yaml", {}),
        ("GET", "/nope", {}),
        ("DELETE", "/chat", {}),
        ("POST", "/chat", {"json": CHAT}),
        ("POST", "/chat", {"json": CHAT, "headers": AUTH}),
        ("POST", "/chat", {"content": b"{not json", "headers": AUTH}),
        ("POST", "/chat", {"json": {"messages": [{"role": "user", "content": "x" * 2_000_000}]}, "headers": AUTH}),
        ("POST", "/chat", {"json": {"messages": [{"role": "user", "content": fake_says({"status": 500})}]},
                           "headers": AUTH}),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "stream": True}, "headers": AUTH}),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "stream": False}, "headers": AUTH}),
        ("POST", "/v1/chat/completions", {"json": {"messages": "no"}, "headers": AUTH}),
        ("GET", "/v1/models", {"headers": AUTH}),
        ("GET", "/v1/models", {}),
        ("GET", "/chat", {"params": {"prompt": "hi", "key": ACCESS_KEY}}),
        ("GET", "/chat", {"params": {"prompt": "hi", "key": "wrong"}}),
        ("OPTIONS", "/chat", {"headers": {"Origin": "https://app.example.com",
                                          "Access-Control-Request-Method": "POST"}}),
        ("OPTIONS", "/chat", {"headers": {"Origin": "https://evil.example",
                                          "Access-Control-Request-Method": "POST"}}),
    ]
    return [client.request(method, path, **kwargs) for method, path, kwargs in requests]


def test_security_headers_and_request_id_on_every_response(client: httpx2.Client,
                                                           secure_relay: RelayProcess) -> None:
    """nosniff, Referrer-Policy and an X-Request-ID on every response, and that ID in the access log."""
    for response in every_kind_of_response(client):
        where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
        assert response.headers.get("x-content-type-options") == "nosniff", where
        assert response.headers.get("referrer-policy") == "no-referrer", where
        assert response.headers.get("x-frame-options") == "DENY", where
        request_id = response.headers.get("x-request-id")
        assert request_id and re.fullmatch(r"[A-Za-z0-9._\-]{1,64}", request_id), where
        # The access-log line is written when the server closes the response, a moment after the client has it.
        logged = f"request_id={request_id}"
        assert wait_until(lambda logged=logged: logged in secure_relay.log_text()), where
        assert response.status_code < 500 or response.request.url.path == "/chat", where


def test_page_has_a_strict_content_security_policy(client: httpx2.Client) -> None:
    """The chat page (it renders model output as HTML) allows no inline script and no other origin."""
    response = client.get("/")
    assert response.status_code == 200
    policy = {part.split()[0]: part.split()[1:] for part in response.headers["content-security-policy"].split("; ")}
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["object-src"] == ["'none'"]
    assert not any("unsafe" in source or source == "*" for sources in policy.values() for source in sources)


def test_no_key_in_any_body_header_or_log_line(client: httpx2.Client, secure_relay: RelayProcess) -> None:
    """Neither access key nor the upstream key appears in any response (body or header) or log line."""
    for response in every_kind_of_response(client):
        assert_no_secrets(response.content, f"the body of {response.request.url}")
        assert_no_secrets(str(response.headers.multi_items()), f"the headers of {response.request.url}")
    log = secure_relay.log_text()
    assert_no_secrets(log, "the relay's log")
    assert "key=[redacted]" in log or "key=%5Bredacted%5D" in log


@pytest.mark.parametrize("endpoint", STREAM_ENDPOINTS, ids=str)
@pytest.mark.parametrize("behaviour", [
    {"status": 401, "error_message": f"Incorrect API key provided: {UPSTREAM_KEY}."},
    {"status": 400, "error_message": f"bad request made with key {UPSTREAM_KEY}"},
    {"status": 500, "error_message": f"internal error for {UPSTREAM_KEY}"},
    {"raw_body": f'data: {{"error":{{"message":"quota exceeded for {UPSTREAM_KEY}","type":"x"}}}}\n\n'},
], ids=["401", "400", "500", "in-stream"])
def test_upstream_echoing_its_key_is_redacted(endpoint: StreamEndpoint, behaviour: dict, secure_relay: RelayProcess,
                                              fake: FakeUpstream) -> None:
    """An upstream error message that repeats the upstream key never carries it to the client or the log."""
    outcome = endpoint.request(secure_relay, fake_says(behaviour))
    assert outcome.errors, outcome.raw[:300]
    assert_no_secrets(outcome.raw, "the answer")
    assert_no_secrets(str(outcome.headers.multi_items()), "the headers")
    assert_no_secrets(secure_relay.log_text(), "the log")


@pytest.mark.parametrize("endpoint", STREAM_ENDPOINTS, ids=str)
def test_access_key_never_reaches_the_upstream(endpoint: StreamEndpoint, secure_relay: RelayProcess,
                                               fake: FakeUpstream) -> None:
    """The upstream sees only the relay's own key: the client's access key is not forwarded anywhere."""
    outcome = endpoint.request(secure_relay, "hello", headers={"X-Api-Key": ACCESS_KEY})
    assert outcome.status == 200
    sent = fake.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ACCESS_KEY not in str(sent.headers) and ACCESS_KEY.encode() not in sent.body


@pytest.mark.parametrize("wrong", [
    None, "", "Bearer", ACCESS_KEY[:-1], ACCESS_KEY + "0", ACCESS_KEY.upper(), "Bearer  x",
    "Basic " + ACCESS_KEY, "Bearer " + ACCESS_KEY[:4], f"Bearer {ACCESS_KEY},{SECOND_ACCESS_KEY}",
    "Bearer " + "k" * 4000, UPSTREAM_KEY,
])
def test_every_wrong_key_gets_the_same_answer(client: httpx2.Client, wrong: str | None) -> None:
    """Missing, empty, prefix, longer, case-changed, other-scheme, joined keys and the upstream key all get
    the same 401 body: nothing tells how close a guess was (the comparison itself is hmac.compare_digest)."""
    headers = {} if wrong is None else {"Authorization": wrong}
    reference = client.post("/chat", json=CHAT)
    response = client.post("/chat", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert response.content == reference.content
    assert "www-authenticate" not in {name.lower() for name in response.headers}


def test_both_key_forms_are_accepted(client: httpx2.Client) -> None:
    """`Authorization: <key>` (old clients) and `Bearer <key>`, for each configured key."""
    for value in (ACCESS_KEY, f"Bearer {ACCESS_KEY}", f"bearer {SECOND_ACCESS_KEY}", SECOND_ACCESS_KEY):
        assert client.post("/chat", json=CHAT, headers={"Authorization": value}).status_code == 200


@pytest.mark.parametrize("endpoint", STREAM_ENDPOINTS[:2], ids=str)
@pytest.mark.parametrize("field", ["base_url", "api_base", "OPENAI_BASE_URL", "url", "upstream", "api_key",
                                   "extra_headers", "extra_query"])
def test_client_cannot_choose_the_upstream(endpoint: StreamEndpoint, field: str, secure_relay: RelayProcess,
                                           fake: FakeUpstream) -> None:
    """Fields and headers naming another upstream or key change nothing: the request still goes to the
    configured upstream, with the configured key."""
    body = endpoint.build("hello")["json"]
    body[field] = "http://127.0.0.1:9/v1" if field != "extra_headers" else {"Authorization": "Bearer sk-evil"}
    headers = {**AUTH, "X-Forwarded-Host": "evil.example", "X-Upstream": "http://127.0.0.1:9",
               "Host": "evil.example"}
    before = len(fake.requests)
    response = httpx2.post(secure_relay.url + endpoint.path, json=body, headers=headers, timeout=20)
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 200:
        assert len(fake.requests) == before + 1
        assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("path", ["/config", "/env", "/.env", "/settings", "/debug", "/debug/vars", "/admin",
                                  "/static/../.env", "/proxy/config.py", "/deploy/gunicorn.conf.py",
                                  "/v1/config", "/healthz?verbose=1", "/metrics?all=1"])
def test_no_endpoint_reads_configuration(client: httpx2.Client, path: str) -> None:
    """Nothing answers with settings: unknown paths are JSON 404s; /healthz shows only its status."""
    response = client.get(path, headers=AUTH)
    assert_no_secrets(response.content, path)
    body = response.text
    for setting in ("OPENAI_BASE_URL", "AUTHORIZATION_KEY", "OPENAI_API_KEY", "127.0.0.1:"):
        assert setting not in body, (path, body[:300])
    if response.status_code == 200:
        assert path.startswith(("/healthz", "/metrics"))


def test_debug_stats_is_absent_by_default(relay: RelayProcess) -> None:
    """`GET /debug/stats` does not exist unless RELAY_DEBUG_STATS=1."""
    response = httpx2.get(f"{relay.url}/debug/stats", headers=AUTH, timeout=10)
    assert response.status_code == 404


def test_debug_stats_needs_a_key(secure_relay: RelayProcess) -> None:
    """Even when enabled (tests only), the counters need an access key; they never show settings."""
    assert httpx2.get(f"{secure_relay.url}/debug/stats", timeout=10).status_code == 401
    stats = httpx2.get(f"{secure_relay.url}/debug/stats", headers=AUTH, timeout=10)
    assert stats.status_code == 200
    assert set(stats.json()) <= {"pid", "greenlets", "threads", "os_threads", "upstream_readers", "fds", "sockets",
                                 "client_sockets", "outbound_sockets", "fds_without_outbound", "rss_kib"}


def test_event_source_prompt_stays_out_of_the_log(client: httpx2.Client, secure_relay: RelayProcess) -> None:
    """`GET /chat?prompt=...` logs the prompt's length, not its text (LOG_CONTENT is off), and no key."""
    response = client.get("/chat", params={"prompt": "my secret diary entry", "key": ACCESS_KEY})
    assert response.status_code == 200
    assert wait_until(lambda: "prompt=%5B21+chars%5D" in secure_relay.log_text())
    assert "diary" not in secure_relay.log_text()


def test_request_id_cannot_inject_log_lines(client: httpx2.Client, secure_relay: RelayProcess) -> None:
    """A client-supplied X-Request-ID is kept only when it is a safe token; anything else is replaced, so
    no one can forge access-log fields or lines through it."""
    kept = client.get("/healthz", headers={"X-Request-ID": "support-ticket-42"})
    assert kept.headers["x-request-id"] == "support-ticket-42"
    forged = client.get("/healthz", headers={"X-Request-ID": "x status=200 key=admin"})
    assert forged.headers["x-request-id"] != "x status=200 key=admin"
    assert "key=admin" not in secure_relay.log_text()


def test_secrets_are_the_ones_configured() -> None:
    """Guard for the scans above: they look for the very keys the relays under test were started with."""
    assert {ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY} == set(SECRETS)
