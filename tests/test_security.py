"""Security: keys never leak (logs, bodies, headers, upstream), access is checked alike for every wrong key,
security headers and request IDs on every response, and no client can steer the upstream or read settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx2
import pytest

from tests.conftest import (
    ACCESS_KEY,
    SECOND_ACCESS_KEY,
    SECRETS,
    UPSTREAM_KEY,
    RelayProcess,
    free_port,
    relay_env,
    start_relay,
)
from tests.fake_upstream import FakeUpstream
from tests.hardening import FAULT_SETTINGS, STREAM_ENDPOINTS, StreamEndpoint, assert_no_secrets, fake_says
from tests.servers import running_caddy, running_nginx, wait_until

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
                                 "client_sockets", "outbound_sockets", "fds_without_outbound", "rss_kib",
                                 "gc_frozen_objects"}


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


# --- the configured secrets, start-up, nginx, forged lines and Retry-After, attacked on the real servers ---------

GROQ_KEY = "gsk_Zq81bNw4TTt0gYh3mKeY5pQ2rL9vXc7aTest"
GLUED = "sk-glued-0a1b2c3d4e5f6a7b"


@pytest.fixture(scope="module")
def groq_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(OPENAI_API_KEY=GROQ_KEY, **FAULT_SETTINGS)


@pytest.mark.parametrize("endpoint", STREAM_ENDPOINTS, ids=str)
@pytest.mark.parametrize("behaviour", [
    {"status": 400, "error_message": f"Invalid API Key {GROQ_KEY}"},
    {"status": 400, "error_message": f"header x_api_key_{GLUED} and Bearer%20{GLUED} refused"},
    {"raw_body": f'data: {{"error":{{"message":"quota exceeded for {GROQ_KEY} (x_api_key_{GLUED})"}}}}\n\n'},
], ids=["400-gsk", "400-glued", "in-stream"])
def test_a_gsk_upstream_key_quoted_by_the_upstream_is_redacted(endpoint: StreamEndpoint, behaviour: dict,
                                                               groq_relay: RelayProcess, fake: FakeUpstream) -> None:
    """With a gsk_ upstream key, an upstream error quoting it (or a glued sk- key) reaches neither the
    client (/chat 400, mid-stream error records) nor the log."""
    outcome = endpoint.request(groq_relay, fake_says(behaviour))
    assert outcome.errors, outcome.raw[:300]
    for text in (outcome.raw.decode(errors="replace"), groq_relay.log_text()):
        assert GROQ_KEY not in text and GLUED not in text and GROQ_KEY[:16] not in text


def _refusal(tmp_path: Path, fake: FakeUpstream, **settings: str) -> str:
    relay = start_relay(tmp_path, relay_env(fake.base_url, **settings), wait=False)
    relay.process.wait(30)
    assert relay.process.returncode != 0
    return relay.log_text()


PASTED = "sk-pasted-into-the-wrong-place-4f2a9c"


@pytest.mark.parametrize(("settings", "variable"), [
    ({"MAX_TOKENS": PASTED}, "MAX_TOKENS"),
    ({"GUNICORN_WORKERS": PASTED}, "GUNICORN_WORKERS"),
    ({"CORS_ORIGINS": PASTED}, "CORS_ORIGINS"),
    ({"KEYS_FILE": PASTED}, "KEYS_FILE"),
    ({"AUTHORIZATION_KEY": "ab"}, "AUTHORIZATION_KEY"),
    ({"AUTHORIZATION_KEY": f"{ACCESS_KEY},tooShort1234"}, "AUTHORIZATION_KEY"),
], ids=["MAX_TOKENS", "GUNICORN_WORKERS", "CORS_ORIGINS", "KEYS_FILE", "2-char-key", "short-second-key"])
def test_gunicorn_refusal_never_echoes_the_value(tmp_path: Path, fake: FakeUpstream, settings: dict[str, str],
                                                 variable: str) -> None:
    """gunicorn refuses to start naming the variable; the rejected value (a pasted key, a short access key)
    is nowhere in its output."""
    log = _refusal(tmp_path, fake, **settings)
    assert f"relay: refusing to start: {variable}" in log, log
    for value in settings.values():
        for part in value.split(","):
            assert part not in log, log


def test_startup_line_shows_urls_without_credentials(tmp_path: Path, fake: FakeUpstream) -> None:
    """OPENAI_BASE_URL with user:password@ and a key in its query: the start-up line shows scheme, host, port
    and path only, and the access keys by their last 4 characters."""
    base = fake.base_url.replace("http://", "http://relayuser:url-pass-9d8c7b6a@", 1) + "?api-key=sk-in-query-1a2b3c"
    relay = start_relay(tmp_path, relay_env(base))
    try:
        log = relay.log_text()
        assert f"relay: upstream {fake.base_url}, default model" in log, log
        for secret in ("url-pass-9d8c7b6a", "relayuser", "sk-in-query-1a2b3c", "api-key", ACCESS_KEY, UPSTREAM_KEY):
            assert secret not in log, secret
        assert f"…{ACCESS_KEY[-4:]}" in log
    finally:
        relay.stop()


def test_nginx_access_log_has_no_key_or_prompt(tmp_path: Path, secure_relay: RelayProcess) -> None:
    """The shipped nginx site in front: `GET /chat?prompt=...&key=...` and `/ws?key=...` leave the path in
    nginx's access log, never the key or the prompt, not even from a Referer that holds them."""
    referer = f"https://relay.example.com/chat?prompt=diary&key={ACCESS_KEY}"
    with running_nginx(tmp_path / "nginx", secure_relay.url.removeprefix("http://")) as nginx:
        answer = httpx2.get(f"{nginx.url}/chat", params={"prompt": "my secret diary", "key": ACCESS_KEY},
                            headers={"Referer": referer}, timeout=20)
        assert answer.status_code == 200
        httpx2.get(f"{nginx.url}/ws", params={"key": SECOND_ACCESS_KEY}, timeout=20)
        access_log = nginx.prefix / "access.log"
        assert wait_until(lambda: access_log.exists() and "/ws" in access_log.read_text())
        log = access_log.read_text()
    assert '"GET /chat HTTP/1.1" 200 ' in log and '"https://relay.example.com/chat"' in log, log
    for secret in (ACCESS_KEY, SECOND_ACCESS_KEY, "diary", "prompt", "key="):
        assert secret not in log, secret


def test_nginx_error_log_has_no_key_or_prompt_when_the_relay_is_down(tmp_path: Path) -> None:
    """The shipped nginx site in front of a relay that is not there (down, restarting): the 502s it answers
    leave the key and the prompt (of the URL and of a Referer) out of nginx's error log and access log."""
    referer = f"https://relay.example.com/chat?prompt=diary&key={SECOND_ACCESS_KEY}"
    with running_nginx(tmp_path / "nginx", f"127.0.0.1:{free_port()}") as nginx:
        for path in ("/chat", "/ws"):
            answer = httpx2.get(f"{nginx.url}{path}", params={"prompt": "my secret diary", "key": ACCESS_KEY},
                                headers={"Referer": referer}, timeout=20)
            assert answer.status_code == 502
        access_log = nginx.prefix / "access.log"
        assert wait_until(lambda: access_log.exists() and access_log.read_text().count('" 502 ') == 2)
        logs = {"access log": access_log.read_text(), "error log": nginx.error_log()}
    for where, log in logs.items():
        for secret in (ACCESS_KEY, SECOND_ACCESS_KEY, "diary", "prompt="):
            assert secret not in log, (where, secret, log[-1500:])


def test_caddy_error_log_has_no_key_or_prompt_when_the_relay_is_down(tmp_path: Path) -> None:
    """The shipped Caddyfile in front of a relay that is not there: Caddy's error entries for the 502s keep
    the path and other parameters but not the key, the prompt or the Referer."""
    referer = f"https://relay.example.com/chat?prompt=diary&key={SECOND_ACCESS_KEY}"
    with running_caddy(tmp_path / "caddy", f"127.0.0.1:{free_port()}") as caddy:
        for path in ("/chat", "/ws"):
            answer = httpx2.get(f"{caddy.url}{path}", params={"prompt": "my secret diary", "key": ACCESS_KEY,
                                                              "model": "m"}, headers={"Referer": referer}, timeout=20)
            assert answer.status_code == 502
        assert wait_until(lambda: caddy.log().count('"uri":"/chat?model=m"') == 1
                          and caddy.log().count('"uri":"/ws?model=m"') == 1), caddy.log()[-1500:]
        log = caddy.log()
    for secret in (ACCESS_KEY, SECOND_ACCESS_KEY, "diary", "prompt=", "Referer"):
        assert secret not in log, (secret, log[-1500:])


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/%0Amethod=GET%20path=/forged%20status=200%20key=admin", None),
    ("GET", "/chat%0D%0A2026-01-01%2000:00:00,000%20INFO%20relay.access%20method=GET%20path=/forged", None),
    ("POST", "/chat", {"model": "m\nmethod=GET path=/forged status=200 key=admin",
                       "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "m\u0000\r\nmethod=GET path=/forged", "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}),
], ids=["path-lf", "path-crlf", "model-lf", "model-nul"])
def test_no_request_forges_a_log_line_through_gunicorn(method: str, path: str, body: dict | None,
                                                        secure_relay: RelayProcess) -> None:
    """A percent-encoded newline in the path (no key needed) or a newline/NUL in `model` stays escaped inside
    its request's one access line: no line of the relay's log begins with a forged record."""
    response = httpx2.request(method, secure_relay.url + path, json=body, headers=AUTH, timeout=20)
    request_id = response.headers["x-request-id"]
    assert wait_until(lambda: f"request_id={request_id}" in secure_relay.log_text())
    lines = secure_relay.log_text().splitlines()
    ours = [line for line in lines if f"request_id={request_id}" in line]
    assert len(ours) == 1 and "forged" in ours[0], ours
    assert not any(re.match(r"(\S+ \S+ INFO relay\.access )?method=GET path=/forged", line) for line in lines)
    assert "\x00" not in secure_relay.log_text()


def test_upstream_retry_after_overflow_is_a_429(secure_relay: RelayProcess, fake: FakeUpstream) -> None:
    """An upstream 429 with `Retry-After: 1e999` (float overflow) is the client's 429 without Retry-After,
    not a 500; an over-long delay is capped at an hour and an HTTP-date is honoured."""
    in_two_minutes = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    for value, expected in (("1e999", None), ("-1", None), ("3601", "3600"), (in_two_minutes, range(115, 122))):
        for path, body in (("/chat", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True})):
            said = {"messages": [{"role": "user", "content": fake_says({"status": 429, "retry_after": value})}]}
            response = httpx2.post(secure_relay.url + path, json={**body, **said}, headers=AUTH, timeout=20)
            assert response.status_code == 429, (value, path, response.text[:300])
            retry_after = response.headers.get("retry-after")
            if isinstance(expected, range):
                assert retry_after is not None and int(retry_after) in expected, (value, retry_after)
            else:
                assert retry_after == expected, (value, path, retry_after)
