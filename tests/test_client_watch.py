"""The pump's check for a departed client works for any descriptor number (issue 6: capacity)."""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator

import pytest

from proxy.pump import socket_watcher

HIGH_DESCRIPTORS = 1100  # select() cannot watch descriptors from 1024 up


@pytest.fixture
def high_socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair whose descriptors are above 1023, as in a worker holding hundreds of streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < HIGH_DESCRIPTORS + 100:
        pytest.skip(f"open-file hard limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_DESCRIPTORS + 100), hard))
    fillers = [socket.socket() for _ in range(HIGH_DESCRIPTORS)]
    server, client = socket.socketpair()
    try:
        assert server.fileno() >= 1024
        yield server, client
    finally:
        for sock in (*fillers, server, client):
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_silent_client_on_a_high_descriptor_is_not_gone(high_socket_pair: tuple[socket.socket, socket.socket]
                                                        ) -> None:
    """A connected, silent client is still there, even on descriptor 1024 or above."""
    server, _client = high_socket_pair
    assert socket_watcher(server)() is False


def test_pipelined_bytes_are_not_consumed_and_not_a_departure(
        high_socket_pair: tuple[socket.socket, socket.socket]) -> None:
    """Bytes the client already sent are left in place and do not count as a departure."""
    server, client = high_socket_pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    assert socket_watcher(server)() is False
    assert server.recv(100) == b"GET / HTTP/1.1\r\n"


def test_closed_client_on_a_high_descriptor_is_gone(high_socket_pair: tuple[socket.socket, socket.socket]) -> None:
    """A client that closed its end is noticed, and the socket's timeout is left as it was."""
    server, client = high_socket_pair
    server.settimeout(5.0)
    client.close()
    assert socket_watcher(server)() is True
    assert server.gettimeout() == 5.0
