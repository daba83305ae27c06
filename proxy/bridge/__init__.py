"""Bridges: a client's protocol translated to one the chosen upstream speaks, and its answer translated back.
Pure translation functions and streaming state machines; the transport stays in the views and the pump."""
