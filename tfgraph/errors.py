"""Errors with their documented exit codes.

Every error a user can cause carries the exit code the CLI returns for it and a
one-line message that says what is wrong and, where possible, what to do.
"""

from __future__ import annotations

import re


# onnxruntime names the file it loaded: for a verification session that is a temporary copy the user never
# saw (tfgraph/deploy/session_weights.py), so that part of its message is dropped.
_SESSION_FILE = re.compile(r"Load model from \S*tfgraph-session-[^\s]*? failed:\s*")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = _SESSION_FILE.sub("", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


class TfgraphError(Exception):
    """Base class of tfgraph's errors."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: the CLI prints ``str(error)`` as the whole message.
        super().__init__(" ".join(str(message).split()))


class BadInputError(TfgraphError):
    """The input (model file, model name, option, output folder) is unusable: exit 2."""

    exit_code = 2


class VerificationError(TfgraphError):
    """The rewritten model's outputs diverged from the input model's: exit 1."""

    exit_code = 1

    def __init__(self, message: str, *, pass_name: str | None = None, report: dict | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.report = report or {}


class StrictError(TfgraphError):
    """``--strict`` found an incomplete result (e.g. attention blocks left unfused): exit 1."""

    exit_code = 1


class PassFailedError(TfgraphError):
    """A pass raised or broke its contract (a bug in that pass, often a user plugin): exit 3,
    naming the registered pass and its position in the pipeline."""

    exit_code = 3

    def __init__(self, message: str, *, pass_name: str | None = None, index: int | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.index = index


class ProviderUnavailableError(BadInputError):
    """An artifact's execution providers cannot run on this machine (and no CPU fallback was asked
    for): exit 2. ``missing`` maps each provider to why it is unavailable; ``install`` says how to
    get it."""

    def __init__(self, message: str, *, missing: dict[str, str] | None = None, install: str = ""):
        super().__init__(message)
        self.missing = dict(missing or {})
        self.install = install
