"""How an upstream failure's status reaches a bridged client: one rule, a table per client protocol
(`messages_errors.MESSAGES`, `responses_errors.RESPONSES`). Pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientStatuses:
    """`by_kind`: relay error kinds whose status is already the client's (the relay's own wording and
    status), whatever the upstream said; `kept`: upstream statuses that mean the same to this protocol's
    SDKs as they are. Anything else keeps the relay's status."""

    kept: frozenset[int]
    by_kind: Mapping[str, int]

    def of(self, kind: str, status: int, upstream_status: int | None) -> int:
        """The status a client gets for a relay error of `kind` and `status` that the upstream's
        `upstream_status` (None: no HTTP answer) caused."""
        if kind in self.by_kind:
            return self.by_kind[kind]
        if upstream_status in self.kept:
            return upstream_status
        return status
