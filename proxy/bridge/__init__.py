"""Bridges: a client protocol served by an upstream that speaks another one (issue #16).

Each bridge is pure translation (request mapping, answer mapping, one streaming state machine) kept apart
from the transport, which stays the relay's own: the pump, its timers, fall-over and keep-alives.
"""
