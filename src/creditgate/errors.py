"""creditgate's exceptions: one root, infrastructure failures wrapped at the edge.

Business outcomes (a rejected charge, a refused command) are return values, not
exceptions; these classes are for what went wrong.
"""

from __future__ import annotations


class CreditgateError(Exception):
    """Root of every error creditgate raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigurationError(CreditgateError):
    """The settings or the environment cannot work (a missing topic, a bad URL)."""


class InfrastructureError(CreditgateError):
    """Redis or Kafka could not be reached; the work must be retried, never acknowledged."""


class StoreUnavailable(InfrastructureError):
    """Redis did not answer or refused the call."""


class RedisMayHaveForgotten(CreditgateError):
    """Redis may lack ledger entries already published (a restart from an older AOF, a
    promoted replica, a flush): nothing more is decided for ``orgs`` (every organisation
    when None) until the worker has healed Redis from the ledger (``stream.healing``)."""

    def __init__(self, why: str, orgs: frozenset[str] | None) -> None:
        scope = "every organisation" if orgs is None else f"{len(orgs)} organisation(s)"
        super().__init__(f"Redis may have forgotten ledger entries of {scope}: {why}")
        self.orgs = orgs
