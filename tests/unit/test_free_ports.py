"""The local stacks' ports: free, below the OS's ephemeral range (where every outgoing
connection takes its local port, so a port picked there can be taken before its server
binds it), and never the same twice in one process."""

from __future__ import annotations

import socket

from creditgate.devstack import find_free_port
from creditgate.devstack.process import ephemeral_port_start


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    ports = [find_free_port() for _ in range(200)]

    assert len(set(ports)) == len(ports)
    assert all(10_000 <= port < ephemeral_port_start() for port in ports)
    for port in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", port))  # raises if it was not free
            server.listen()
