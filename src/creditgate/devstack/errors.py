"""The one error the dev stack raises."""

from __future__ import annotations


class DevStackError(Exception):
    """The local Kafka or Redis could not be fetched, started, reached or stopped.

    The message is meant for a person at a terminal: it says what failed and,
    where it helps, how to fix it or the tail of the server's log.
    """
