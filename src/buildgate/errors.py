"""The error hierarchy.

Every error carries the data a user needs and a one-line message that names the
problem and the fix.  Nothing here prints or exits: ``cli.py`` maps each class to
an exit code in one table (see docs/exit-codes.md).
"""

from __future__ import annotations


class BuildgateError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""


class UsageError(BuildgateError):
    """Bad command-line input (exit 2)."""


class SizeError(UsageError):
    def __init__(self, text: str, why: str) -> None:
        self.text = text
        self.why = why
        super().__init__(
            f"invalid size {text!r}: {why}; use a number with an optional K, M, G or T "
            f"suffix (base 1024, e.g. 2.5G) or a percentage of the budget (e.g. 50%)"
        )


class ReservationTooLarge(UsageError):
    def __init__(self, mem: int, budget: int, budget_source: str) -> None:
        from buildgate.sizes import format_size

        self.mem = mem
        self.budget = budget
        super().__init__(
            f"--mem {format_size(mem)} is more than the build budget {format_size(budget)} "
            f"({budget_source}): lower --mem, or raise the budget"
        )


class ConfigError(BuildgateError):
    """The config file is unreadable or invalid (exit 78)."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"config {path}: {why}")


class PermissionProblem(BuildgateError):
    """Unsafe or inaccessible state, or a caller that is not allowed (exit 77)."""


class Unavailable(BuildgateError):
    """systemd (or another service buildgate needs) is unreachable (exit 69)."""


class WouldBlock(BuildgateError):
    """--no-wait and the build cannot start now (exit 75)."""


class QueueTimeout(BuildgateError):
    """--wait ran out before the build could start (exit 124 or -E)."""

    def __init__(self, waited: float, message: str) -> None:
        self.waited = waited
        super().__init__(message)


class CommandNotFound(BuildgateError):
    """The build command does not exist (exit 127, like a shell)."""

    def __init__(self, command: str) -> None:
        self.command = command
        super().__init__(f"command not found: {command}: check the spelling and PATH")


class CommandNotExecutable(BuildgateError):
    """The build command exists but cannot be executed (exit 126, like a shell)."""

    def __init__(self, command: str, why: str) -> None:
        self.command = command
        super().__init__(f"cannot execute {command}: {why}: check its permissions and interpreter line")


class Interrupted(BuildgateError):
    """buildgate got SIGINT/SIGTERM (exit 128+N) after stopping whatever it started."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        super().__init__(message)


class InternalFailure(BuildgateError):
    """buildgate itself failed in an unexpected way (exit 125)."""
