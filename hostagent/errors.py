"""One exception root for everything hostagent raises on purpose.

Modelled on dnspython's DNSException: the class docstring is the default message, and keyword
context (path=, line=, rule=) is kept on the instance and rendered into the message, so callers
can both print a clear sentence and inspect what went wrong.
"""

from __future__ import annotations


class HostAgentError(Exception):
    """hostagent failed."""

    def __init__(self, msg: str | None = None, **context: object) -> None:
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)
        super().__init__(msg or (self.__doc__ or "").strip())

    def __str__(self) -> str:
        msg = super().__str__()
        where = self.where()
        return f"{where}: {msg}" if where else msg

    def where(self) -> str:
        """file:line prefix when the error is about a place in a file."""
        path = self.context.get("path")
        if not path:
            return ""
        line = self.context.get("line")
        return f"{path}:{line}" if line else str(path)


class ConfigError(HostAgentError):
    """The node configuration is invalid."""


class PolicyError(HostAgentError):
    """A policy is invalid."""


class PolicyCapacityError(PolicyError):
    """The policy does not fit the kernel maps."""


class KernelError(HostAgentError):
    """The kernel refused an operation."""


class SetupError(HostAgentError):
    """The machine is missing something hostagent needs (headers, bpffs, cgroup v2)."""


class Timeout(HostAgentError):
    """An operation timed out."""
