"""`python -m proxy doctor URL KEY`: does the path from here to the relay stream properly?

It reads the relay's `GET /doctor` test stream (records at a steady rhythm, a long silence carried by
keep-alive lines, a few more records, [DONE]) from wherever you run it, and says in plain words whether
records arrive as they are written, where they get held back, and whether keep-alive lines carried the
stream through the silence. Exit status: 0 when the path is fine, 1 when it found a problem, 2 when it
could not run the test at all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2

DEFAULT_RECORDS = 8
DEFAULT_INTERVAL = 0.5
DEFAULT_GAP = 75.0
DEFAULT_AFTER = 3


@dataclass
class Arrival:
    at: float  # seconds since the request went out
    record: dict[str, Any] | None  # a doctor record; None for a keep-alive line


@dataclass
class Reading:
    """What came back, with arrival times, and how the stream ended."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    ending: str = "open"  # "done", "cut", "relay_error", "stalled", "refused", "unreachable"
    ended_at: float = 0.0
    detail: str = ""

    def records(self, phase: str | None = None) -> list[Arrival]:
        return [a for a in self.arrivals if a.record is not None and (phase is None or a.record["phase"] == phase)]

    def keepalives(self) -> list[float]:
        return [a.at for a in self.arrivals if a.record is None]


@dataclass
class Finding:
    ok: bool
    text: str


def read_doctor(url: str, key: str, records: int = DEFAULT_RECORDS, interval: float = DEFAULT_INTERVAL,
                gap: float = DEFAULT_GAP, after: int = DEFAULT_AFTER, connect_timeout: float = 15.0) -> Reading:
    """Fetch `GET <url>/doctor` and note when each line arrives."""
    reading = Reading()
    params = {"records": records, "interval": interval, "gap": gap, "after": after}
    # Never cut the stream from this side: allow the whole silence and then some.
    timeout = httpx2.Timeout(connect_timeout, read=gap + 60.0)
    start = time.monotonic()
    try:
        with httpx2.stream("GET", url.rstrip("/") + "/doctor", params=params, timeout=timeout,
                           headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "gzip, br"}) as response:
            reading.status = response.status_code
            reading.headers = {name.lower(): value for name, value in response.headers.items()}
            if response.status_code != 200:
                reading.ending = "refused"
                reading.detail = response.read().decode(errors="replace")[:500]
                return reading
            pending = b""
            for block in response.iter_bytes():
                now = time.monotonic() - start
                pending += block
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    _note_line(reading, line, now)
            if reading.ending == "open":
                reading.ending = "cut"
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as exc:
        reading.ending, reading.detail = "cut", str(exc) or type(exc).__name__
    except httpx2.ReadTimeout:
        reading.ending = "stalled"
    except httpx2.TransportError as exc:
        reading.ending, reading.detail = "unreachable", str(exc) or type(exc).__name__
    reading.ended_at = time.monotonic() - start
    return reading


def _note_line(reading: Reading, line: bytes, now: float) -> None:
    if not line.strip():
        reading.arrivals.append(Arrival(now, None))
        return
    try:
        record = json.loads(line)
    except ValueError:
        reading.detail = f"a line that is not JSON arrived: {line[:80]!r}"
        return
    if record.get("done"):
        reading.ending = "done" if reading.ending == "open" else reading.ending
    elif record.get("error"):
        reading.ending, reading.detail = "relay_error", str(record.get("content"))
    else:
        try:
            reading.arrivals.append(Arrival(now, json.loads(record["content"])))
        except (KeyError, TypeError, ValueError):
            reading.detail = "a record without the doctor's content arrived"


def diagnose(reading: Reading, records: int = DEFAULT_RECORDS, interval: float = DEFAULT_INTERVAL,
             gap: float = DEFAULT_GAP) -> list[Finding]:
    """Plain-words findings about one reading."""
    if reading.ending == "unreachable":
        return [Finding(False, f"could not reach the relay: {reading.detail}")]
    if reading.ending == "refused":
        return [Finding(False, _refusal(reading))]
    findings = [_rhythm(reading, records, interval), _silence(reading, gap)]
    if reading.ending == "done":
        findings.append(Finding(True, "the stream ended properly with the [DONE] record"))
    elif reading.ending == "relay_error":
        findings.append(Finding(False, f"the relay ended the stream with an error: {reading.detail}"))
    elif reading.ending == "stalled":
        findings.append(Finding(False, "the stream stopped moving without closing: the path holds the "
                                       "connection open but delivers nothing"))
    compressed = reading.headers.get("content-encoding")
    if compressed and compressed != "identity":
        findings.append(Finding(False, f"the response arrived compressed (Content-Encoding: {compressed}), "
                                       "but the relay never compresses: a proxy on the path did, and "
                                       "compression holds records back until its buffer fills. Turn it off "
                                       "for the relay (nginx: gzip off; Cloudflare: a Compression Rule)"))
    return findings


def _refusal(reading: Reading) -> str:
    status = reading.status
    if status == 401:
        return "the relay refused the key (401): check the access key"
    if status == 404:
        return "no /doctor at this URL (404): is this the relay's address, and a version with the doctor?"
    if status == 429:
        return "the relay is rate limiting this key (429); try again later"
    if status in (502, 503, 504):
        return f"a proxy answered {status}: it could not reach the relay behind it (is gunicorn running?)"
    return f"the request was answered with HTTP {status}: {reading.detail[:200]}"


def _rhythm(reading: Reading, records: int, interval: float) -> Finding:
    rhythm = reading.records("rhythm")
    if not rhythm:
        return Finding(False, "no record arrived before the silence: " + (
            "the whole stream was held back" if reading.records() else "nothing arrived at all"))
    bunches = _bunches([a.at for a in rhythm], interval)
    sent_span = _sent(rhythm[-1]) - _sent(rhythm[0])
    first = rhythm[0].at
    if len(rhythm) < records:
        return Finding(False, f"only {len(rhythm)} of {records} records arrived before the silence")
    if max(bunches) == 1:
        return Finding(True, f"records arrive as they are written: {records} records {interval:g} s apart "
                             f"arrived one by one over {rhythm[-1].at - first:.1f} s (first after {first:.2f} s)")
    held_to_the_end = reading.records("after_gap") and rhythm[0].at >= reading.records("after_gap")[0].at - 0.05
    where = ("all at once, only after the silence" if held_to_the_end
             else f"in {len(bunches)} bunches (largest {max(bunches)})")
    return Finding(False, f"records are held back: {records} records written {interval:g} s apart over "
                          f"{sent_span:.1f} s arrived {where}. Something on the path buffers the response "
                          f"({_suspects(reading)})")


def _bunches(times: list[float], interval: float) -> list[int]:
    """Sizes of the groups of records that arrived together (closer than a third of their spacing)."""
    sizes = [1]
    for earlier, later in itertools.pairwise(times):
        if later - earlier < interval / 3:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def _silence(reading: Reading, gap: float) -> Finding:
    rhythm, after = reading.records("rhythm"), reading.records("after_gap")
    keepalive = _plan(reading).get("keepalive_seconds")
    every = f"every {keepalive:g} s" if isinstance(keepalive, int | float) else "regularly"
    if not rhythm:
        return Finding(False, "the silence could not be tested: no record arrived before it")
    silence_start = rhythm[-1].at
    if not after:
        lasted = reading.ended_at - silence_start
        kept = [at for at in reading.keepalives() if at > silence_start]
        if isinstance(keepalive, int | float) and lasted < keepalive:
            return Finding(False, f"the stream was cut {lasted:.0f} s into a {gap:g} s silence, before the relay's "
                                  f"first keep-alive line was due ({every}): something on the path cuts streams "
                                  f"after about {lasted:.0f} s of silence. Set KEEPALIVE_SECONDS well below that, "
                                  "or raise that proxy's timeout (nginx: proxy_read_timeout)")
        if kept:
            return Finding(False, f"the stream was cut {lasted:.0f} s into a {gap:g} s silence although keep-alive "
                                  f"lines ({every}) reached you: something on the path limits a stream's length, "
                                  "or its idle timeout ignores blank lines")
        return Finding(False, f"the stream was cut {lasted:.0f} s into a {gap:g} s silence, and none of the "
                              f"keep-alive lines the relay sends {every} reached you: a proxy held them back "
                              f"and its idle timeout cut the stream ({_suspects(reading)})")
    sent_gap = _sent(after[0]) - _sent(rhythm[-1])
    arrived_gap = after[0].at - silence_start
    if arrived_gap < sent_gap / 2:
        return Finding(False, f"the {sent_gap:.1f} s silence reached you as {arrived_gap:.1f} s: what was sent before "
                              "it was held back until after it, keep-alive lines included, so they could not keep "
                              "the connection busy; a buffering proxy with a shorter idle timeout would cut such "
                              "a stream")
    moments = [silence_start] + [at for at in reading.keepalives() if silence_start < at < after[0].at] + [after[0].at]
    longest = max(later - earlier for earlier, later in itertools.pairwise(moments))
    if isinstance(keepalive, int | float) and longest <= 2 * keepalive + 1.0:
        return Finding(True, f"keep-alive carried the stream through {gap:g} s of silence: a blank line arrived "
                             f"{every}, the longest quiet stretch was {longest:.1f} s")
    return Finding(False, f"the stream survived {gap:g} s of silence, but the keep-alive lines sent {every} did "
                          f"not arrive as sent (the longest quiet stretch was {longest:.1f} s): a proxy held them "
                          "back, and one with a shorter idle timeout would cut such a stream")


def _sent(arrival: Arrival) -> float:
    return float(arrival.record["sent"]) if arrival.record else 0.0


def _plan(reading: Reading) -> dict[str, Any]:
    records = reading.records()
    first = records[0].record if records else None
    return dict(first.get("plan", {})) if first else {}


def _suspects(reading: Reading) -> str:
    """Which hops the evidence points at, in words."""
    headers = reading.headers
    hops = []
    if "cf-ray" in headers:
        hops.append("Cloudflare (CF-Ray)")
    if "via" in headers:
        hops.append(f"a proxy that says Via: {headers['via']}")
    server = headers.get("server")
    if server and server.lower() not in ("gunicorn",):
        hops.append(f"the server that answered, {server}")
    seen = _plan(reading).get("seen_headers", {})
    if seen.get("X-Forwarded-For"):
        hops.append(f"{seen['X-Forwarded-For'].count(',') + 1} proxy hop(s) before the relay (X-Forwarded-For)")
    suspects = "; ".join(hops) if hops else "no proxy announced itself"
    return (f"seen on the way: {suspects}. Run the doctor on the relay's own host against "
            "http://127.0.0.1:8000 to confirm the relay itself streams; then fix the proxy: "
            "nginx `proxy_buffering off` and `gzip off` for the relay, Cloudflare: no compression or "
            "caching rules on this path")


def report(url: str, findings: list[Finding], records: int, interval: float, gap: float, after: int,
           tested: bool = True) -> str:
    """The findings and a verdict; `tested` is false when no stream came back to judge the path by."""
    lines = [f"relay doctor: {url} ({records} records {interval:g} s apart, {gap:g} s of silence, "
             f"{after} more)"]
    lines += [f"{'OK     ' if finding.ok else 'PROBLEM'} {finding.text}" for finding in findings]
    if not tested:
        lines.append(f"verdict: could not test this path: {findings[0].text}.")
    elif all(finding.ok for finding in findings):
        lines.append("verdict: this path streams the relay's answers properly.")
    else:
        lines.append("verdict: this path does not stream properly; see PROBLEM above.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the relay's base URL, as clients use it (https://relay.example.com)")
    parser.add_argument("key", help="an access key")
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between records")
    parser.add_argument("--gap", type=float, default=DEFAULT_GAP, help="seconds of silence to test")
    parser.add_argument("--after", type=int, default=DEFAULT_AFTER)
    args = parser.parse_args(argv)
    print(f"testing {args.url}: this takes about {args.records * args.interval + args.gap:.0f} s ...", flush=True)
    reading = read_doctor(args.url, args.key, args.records, args.interval, args.gap, args.after)
    findings = diagnose(reading, args.records, args.interval, args.gap)
    tested = reading.ending not in ("unreachable", "refused")
    print(report(args.url, findings, args.records, args.interval, args.gap, args.after, tested))
    if not tested:
        return 2
    return 0 if all(finding.ok for finding in findings) else 1
