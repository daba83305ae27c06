"""The models the relay offers: each upstream's own `GET /models`, cached, merged with the configured names.

`GET /v1/models` must tell clients what they can really ask for, so each upstream is asked (through its SDK
client, raw response, parsed once) and its answer reused for MODELS_CACHE_SECONDS. Asking never breaks the
endpoint: the upstreams whose list is due are asked in parallel, the request waits for them at most
`LIST_TIMEOUT_SECONDS` (a slow one finishes in the background and serves the next request), and one that
fails keeps its last good list (or none) and is not asked again before the back-off has passed. The
configured exact names (DEFAULT_MODEL, ALLOWED_MODELS', the upstreams file's) are listed whatever the
upstreams say, so a relay whose upstream cannot be asked still lists what it is configured to serve.

Anthropic-protocol upstreams (`api = "anthropic"`) are asked too, in their protocol (`GET /v1/models` with
`x-api-key` and `anthropic-version`, following `has_more` pages), and their entries (`type`, `id`,
`display_name`, `created_at`) become OpenAI entries that keep `display_name` and `created_at`; all upstreams
are merged in UPSTREAMS_FILE order (`in_file_order`). A caller speaking Anthropic's protocol (its request
carries `anthropic-version`, as the anthropic SDKs and Claude Code send on every request) gets the same list
in Anthropic's shape and pagination (`anthropic_page`, `anthropic_model`).

The merge (`model_entries`) is a pure function: configured exact names first, in configuration order (the
chat page offers the first, DEFAULT_MODEL, as its default), then each upstream's list in upstream order. The
first upstream to list a model owns it; an upstream's list counts only where its own `models` globs match.
Every entry is filtered by ALLOWED_MODELS and the calling key's `models`. Entries keep the fields the upstream
gave, except `owned_by`, which names the relay's upstream that serves it (what a client of several upstreams
needs to know; the upstream's own owner string says nothing about the route).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx2
import openai
import orjson

from proxy.config import Config
from proxy.globs import model_allowed
from proxy.upstream import AnthropicUpstream, Upstream

log = logging.getLogger("relay.models")

GLOB_CHARACTERS = frozenset("*?[")
# Listing is a side errand of a request: it may hold the request this long at most (less with a shorter
# UPSTREAM_TIMEOUT), whatever the upstream's own timeouts.
LIST_TIMEOUT_SECONDS = 5.0
# An upstream that failed to list is asked again after this long (or MODELS_CACHE_SECONDS when shorter):
# soon enough to notice its recovery, not on every request while it is down.
FAILURE_BACKOFF_SECONDS = 15.0

Entry = dict[str, Any]
# An upstream whose models are listed: OpenAI's protocol (through its SDK client) or Anthropic's.
Lister = Upstream | AnthropicUpstream
ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_PAGE_LIMIT = 1000  # Anthropic's largest page
ANTHROPIC_MAX_PAGES = 5  # a list longer than 5000 models is cut there: listing is a side errand


@dataclass
class _Listing:
    """One upstream's cached list: the last good one, when to ask again, and the fetch under way."""

    models: tuple[Entry, ...] = ()
    due: float = 0.0  # clock time from which the list is asked for again
    fetching: threading.Event | None = None  # set when the fetch under way ends


@dataclass
class ModelCatalog:
    """Each upstream's own model list, cached per upstream name. `clock` is injectable for tests."""

    ttl: float
    timeout: float = LIST_TIMEOUT_SECONDS
    backoff: float = FAILURE_BACKOFF_SECONDS
    clock: Callable[[], float] = time.monotonic
    _listings: dict[str, _Listing] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, config: Config) -> ModelCatalog:
        return cls(ttl=config.models_cache_seconds, timeout=min(config.upstream_timeout, LIST_TIMEOUT_SECONDS))

    def listed(self, upstreams: Iterable[Lister]) -> dict[str, tuple[Entry, ...]]:
        """Each upstream's models (its globs applied), asking those whose list is due; waits `timeout` at most."""
        upstreams = tuple(upstreams)
        waits = [event for upstream in upstreams if (event := self._start_if_due(upstream)) is not None]
        deadline = time.monotonic() + self.timeout  # a real wait, whatever clock decides when lists are due
        for event in waits:
            event.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return {upstream.name: self._listings[upstream.name].models for upstream in upstreams}

    def _start_if_due(self, upstream: Lister) -> threading.Event | None:
        """The event of this upstream's fetch under way (started now when its list is due), or None."""
        with self._lock:
            listing = self._listings.setdefault(upstream.name, _Listing())
            if listing.fetching is None and self.clock() >= listing.due:
                listing.fetching = threading.Event()
                # A thread (a greenlet under gevent) per due upstream: one slow upstream delays no other.
                threading.Thread(target=self._fetch, args=(upstream, listing.fetching), daemon=True,
                                 name=f"models-{upstream.name}").start()
            return listing.fetching

    def _fetch(self, upstream: Lister, done: threading.Event) -> None:
        models: tuple[Entry, ...] | None = None
        try:
            if isinstance(upstream, AnthropicUpstream):
                models = fetch_anthropic_models(upstream, self.timeout)
            else:
                models = fetch_models(upstream, self.timeout)
        except (openai.APIError, httpx2.HTTPError) as exc:
            log.warning("upstream %s did not list its models (%s); listing the configured names",
                        upstream.name, type(exc).__name__)
        except ValueError:
            log.warning("upstream %s answered GET /models with something that is not a model list", upstream.name)
        finally:
            self._store(upstream.name, models)
            done.set()

    def _store(self, name: str, models: tuple[Entry, ...] | None) -> None:
        with self._lock:
            listing = self._listings[name]
            if models is None:  # keep the last good list: an upstream that blips still lists what it served
                listing.due = self.clock() + min(self.backoff, self.ttl)
            else:
                listing.models, listing.due = models, self.clock() + self.ttl
            listing.fetching = None


def fetch_models(upstream: Upstream, timeout: float) -> tuple[Entry, ...]:
    """The entries of the upstream's `GET /models` whose id its globs serve. openai.APIError when the
    request fails, ValueError when the answer is not OpenAI's list shape."""
    response = upstream.client.models.with_raw_response.list(timeout=httpx2.Timeout(timeout))
    document = orjson.loads(response.http_response.content)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise ValueError("no 'data' array")
    return tuple(entry for entry in data
                 if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"].strip()
                 and upstream.serves(entry["id"]))


def fetch_anthropic_models(upstream: AnthropicUpstream, timeout: float) -> tuple[Entry, ...]:
    """An Anthropic-protocol upstream's `GET /v1/models`, page after page, as OpenAI entries (whose id its
    globs serve). httpx2.HTTPError when a request fails, ValueError when an answer is not Anthropic's list."""
    headers = {**upstream.auth_headers(), "anthropic-version": ANTHROPIC_VERSION}
    params = {"limit": str(ANTHROPIC_PAGE_LIMIT)}
    entries: list[Entry] = []
    for _page in range(ANTHROPIC_MAX_PAGES):
        response = upstream.http.get(f"{upstream.root_url}/v1/models", params=params, headers=headers,
                                     timeout=httpx2.Timeout(timeout))
        response.raise_for_status()
        document = orjson.loads(response.content)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise ValueError("no 'data' array")
        entries.extend(openai_entry(entry) for entry in data
                       if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"].strip()
                       and upstream.serves(entry["id"]))
        last = document.get("last_id")
        if document.get("has_more") is not True or not isinstance(last, str):
            break
        params = {"limit": str(ANTHROPIC_PAGE_LIMIT), "after_id": last}
    return tuple(entries)


def openai_entry(anthropic: Entry) -> Entry:
    """An Anthropic model entry as an OpenAI one, keeping `display_name` and `created_at`."""
    entry: Entry = {"id": anthropic["id"], "object": "model", "created": _epoch(anthropic.get("created_at"))}
    for name in ("display_name", "created_at"):
        if isinstance(anthropic.get(name), str):
            entry[name] = anthropic[name]
    return entry


def _epoch(stamp: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def anthropic_model(entry: Entry) -> Entry:
    """A model entry in Anthropic's shape (`GET /v1/models/{id}` for an Anthropic client)."""
    created = entry.get("created_at")
    if not isinstance(created, str):
        stamp = entry.get("created")
        created = datetime.fromtimestamp(stamp if isinstance(stamp, int) else 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": entry["id"], "display_name": entry.get("display_name") or entry["id"],
            "created_at": created}


def anthropic_page(entries: Sequence[Entry], args: Mapping[str, str]) -> dict[str, Any]:
    """One page of the list in Anthropic's shape, with its pagination: `limit` (1 to 1000, default 20),
    `after_id` or `before_id` (an id of the list; an unknown one gives an empty page)."""
    try:
        limit = min(max(int(args.get("limit", "20")), 1), ANTHROPIC_PAGE_LIMIT)
    except ValueError:
        limit = 20
    ids = [entry["id"] for entry in entries]
    start, end = 0, len(entries)
    if "after_id" in args:
        start = ids.index(args["after_id"]) + 1 if args["after_id"] in ids else end
        end = min(end, start + limit)
    elif "before_id" in args:
        end = ids.index(args["before_id"]) if args["before_id"] in ids else 0
        start = max(0, end - limit)
    else:
        end = min(end, limit)
    page = [anthropic_model(entry) for entry in entries[start:end]]
    has_more = end < len(entries) if "before_id" not in args else start > 0
    return {"data": page, "has_more": has_more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


def in_file_order(config: Config, upstreams: Iterable[Lister]) -> tuple[Lister, ...]:
    """Every upstream in UPSTREAMS_FILE order, whatever its protocol (others, as the demo's, in the order
    given)."""
    order = {spec.name: number for number, spec in enumerate(config.upstreams)}
    return tuple(sorted(upstreams, key=lambda upstream: order.get(upstream.name, len(order))))


def configured_names(config: Config, upstreams: Iterable[Lister]) -> list[str]:
    """The exact model names the configuration gives, in its order: default, allow-list, upstreams file."""
    names = [config.default_model, *config.allowed_models]
    for upstream in upstreams:
        names.extend(name for name, _own in upstream.model_map)
        names.extend(upstream.models)
    return [name for name in dict.fromkeys(names) if not GLOB_CHARACTERS & set(name)]


def model_entries(config: Config, upstreams: tuple[Lister, ...], listed: Mapping[str, tuple[Entry, ...]],
                  key_models: tuple[str, ...] = ()) -> list[Entry]:
    """The model list one caller sees: configured exact names, then every upstream's listed models, each
    once, owned by the first upstream listing it (else the first serving it), filtered by ALLOWED_MODELS
    and the key's own `models`."""
    owners: dict[str, tuple[str, Entry]] = {}
    for upstream in upstreams:
        for entry in listed.get(upstream.name, ()):
            owners.setdefault(entry["id"], (upstream.name, entry))
    entries: dict[str, Entry] = {}
    for name in [*configured_names(config, upstreams), *owners]:
        if name in entries or not model_allowed(config.allowed_models, name) or not model_allowed(key_models, name):
            continue
        owner, entry = owners.get(name) or _configured_entry(name, upstreams)
        if owner:
            entries[name] = {"object": "model", "created": 0, **entry, "owned_by": owner}
    return list(entries.values())


def _configured_entry(name: str, upstreams: tuple[Lister, ...]) -> tuple[str, Entry]:
    # A configured name no upstream listed: routed to the first upstream whose globs serve it, as a request is.
    serving = next((upstream for upstream in upstreams if upstream.serves(name)), None)
    return (serving.name if serving is not None else "", {"id": name})
