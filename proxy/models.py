"""The models the relay offers: each upstream's own `GET /models`, cached, merged with the configured names.

`GET /v1/models` must tell clients what they can really ask for, so each upstream is asked (through its SDK
client, raw response, parsed once) and its answer reused for MODELS_CACHE_SECONDS. Asking never breaks the
endpoint: the upstreams whose list is due are asked in parallel, the request waits for them at most
`LIST_TIMEOUT_SECONDS` (a slow one finishes in the background and serves the next request), and one that
fails keeps its last good list (or none) and is not asked again before the back-off has passed. The
configured exact names (DEFAULT_MODEL, ALLOWED_MODELS', the upstreams file's) are listed whatever the
upstreams say, so a relay whose upstream cannot be asked still lists what it is configured to serve.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import orjson

from proxy.config import Config
from proxy.upstream import Upstream, model_allowed

log = logging.getLogger("relay.models")

GLOB_CHARACTERS = frozenset("*?[")
# Listing is a side errand of a request: it may hold the request this long at most (less with a shorter
# UPSTREAM_TIMEOUT), whatever the upstream's own timeouts.
LIST_TIMEOUT_SECONDS = 5.0
# An upstream that failed to list is asked again after this long (or MODELS_CACHE_SECONDS when shorter):
# soon enough to notice its recovery, not on every request while it is down.
FAILURE_BACKOFF_SECONDS = 15.0

Entry = dict[str, Any]


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

    def listed(self, upstreams: Iterable[Upstream]) -> dict[str, tuple[Entry, ...]]:
        """Each upstream's models (its globs applied), asking those whose list is due; waits `timeout` at most."""
        upstreams = tuple(upstreams)
        waits = [event for upstream in upstreams if (event := self._start_if_due(upstream)) is not None]
        deadline = time.monotonic() + self.timeout  # a real wait, whatever clock decides when lists are due
        for event in waits:
            event.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return {upstream.name: self._listings[upstream.name].models for upstream in upstreams}

    def _start_if_due(self, upstream: Upstream) -> threading.Event | None:
        """The event of this upstream's fetch under way (started now when its list is due), or None."""
        with self._lock:
            listing = self._listings.setdefault(upstream.name, _Listing())
            if listing.fetching is None and self.clock() >= listing.due:
                listing.fetching = threading.Event()
                # A thread (a greenlet under gevent) per due upstream: one slow upstream delays no other.
                threading.Thread(target=self._fetch, args=(upstream, listing.fetching), daemon=True,
                                 name=f"models-{upstream.name}").start()
            return listing.fetching

    def _fetch(self, upstream: Upstream, done: threading.Event) -> None:
        models: tuple[Entry, ...] | None = None
        try:
            models = fetch_models(upstream, self.timeout)
        except openai.APIError as exc:
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


def configured_names(config: Config, upstreams: Iterable[Upstream]) -> list[str]:
    """The exact model names the configuration gives, in its order: default, allow-list, upstreams file."""
    names = [config.default_model, *config.allowed_models]
    for upstream in upstreams:
        names.extend(name for name, _own in upstream.model_map)
        names.extend(upstream.models)
    return [name for name in dict.fromkeys(names) if not GLOB_CHARACTERS & set(name)]


def model_entries(config: Config, upstreams: tuple[Upstream, ...], listed: Mapping[str, tuple[Entry, ...]],
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


def _configured_entry(name: str, upstreams: tuple[Upstream, ...]) -> tuple[str, Entry]:
    # A configured name no upstream listed: routed to the first upstream whose globs serve it, as a request is.
    serving = next((upstream for upstream in upstreams if upstream.serves(name)), None)
    return (serving.name if serving is not None else "", {"id": name})
