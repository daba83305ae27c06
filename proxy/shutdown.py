"""Graceful shutdown: when the worker is asked to stop (SIGTERM, also sent to old workers on a SIGHUP
reload), open streams get until a deadline to finish; any still open then ends with an error record and
the protocol's proper end instead of a cut connection."""

from __future__ import annotations

import math
import time

SERVER_RESTARTING = "server_restarting"
RESTART_MESSAGE = "the relay is restarting and had to end this answer early; please retry"


class Draining:
    """A stop notice shared by the worker's streams; `deadline` is a time.monotonic() value (inf: none)."""

    def __init__(self) -> None:
        self.deadline = math.inf

    def begin(self, grace_seconds: float) -> None:
        """Streams must be ended within `grace_seconds` from now (an earlier notice keeps its deadline)."""
        self.deadline = min(self.deadline, time.monotonic() + max(0.0, grace_seconds))

    @property
    def active(self) -> bool:
        return self.deadline != math.inf
