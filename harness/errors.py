"""The one exception type for user mistakes.

Anything the user can fix (a bad config, a missing file, a corpus too short for the protocol)
raises ``HarnessError`` with one line that names the problem and the fix. The CLI prints that
line and exits non-zero without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HarnessError(Exception):
    """A problem the user can fix; ``str(error)`` is the one line shown to them."""

    exit_code = 2


class ConfigError(HarnessError):
    """The configuration is invalid; the message lists every problem found, each naming its key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid config: " + "; ".join(problems))


class HarnessWarning(UserWarning):
    """Something the user should know that does not stop the run (a fallback, a slow setting);
    the CLI prints it as one line, ``warning: ...``."""


def printable(text: object) -> str:
    """``text`` with control and line-break characters escaped as Python writes them (``\\n``), so a
    key or value with a newline in it cannot split an error's one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
