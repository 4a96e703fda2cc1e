# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The exceptions the agent raises. Every message is one line naming the object, the cause and the fix."""

from __future__ import annotations

import argparse
import sys


# `start` exits with this when it cannot get ready without a new join token (the unit's RestartPreventExitStatus=).
EXIT_NEEDS_TOKEN = 78


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit 2, like every other user mistake."""

    def error(self, message):
        sys.stderr.write("machine-id-agent: error: %s; see 'machine-id-agent %s--help'\n"
                         % (message, (self.prog.split(" ", 1)[1] + " ") if " " in self.prog else ""))
        sys.exit(2)


class AgentError(Exception):
    """A failure the user can act on; ``str()`` is one line naming the cause and the fix."""

    exit_code = 1

    @property
    def needs_token(self) -> bool:
        """Only a new join token can fix this (a spent or refused token, an expired, locked or untrusted identity)."""
        return bool(self.details.get("needs_token"))

    def __init__(self, msg: str, **details):
        msg = " ".join(str(msg).split("\n"))
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return self.msg


class ConfigError(AgentError):
    """The configuration file (or a command-line argument) is wrong. Exit code 2."""

    exit_code = 2


class JoinError(AgentError):
    """Joining failed: token rejected, used or expired, CA pin mismatch."""

    exit_code = 3


class RenewError(AgentError):
    """A renewal failed. ``retryable`` says whether trying again later can help."""

    exit_code = 4

    def __init__(self, msg: str, retryable: bool = True, **details):
        super().__init__(msg, **details)
        self.retryable = retryable


class LockedError(RenewError):
    """The bot is locked (e.g. generation mismatch): renewing again cannot help."""

    exit_code = 5

    def __init__(self, msg: str, retryable: bool = False, **details):
        details.setdefault("needs_token", True)
        super().__init__(msg, retryable=retryable, **details)


class OutputError(AgentError):
    """Writing an output (files, ACLs, reload command) failed. ``retryable`` is True for a cause that goes away
    without anyone telling the agent (a full filesystem): the service then retries with backoff instead of at the
    next renewal interval."""

    exit_code = 6

    def __init__(self, msg: str, retryable: bool = False, **details):
        super().__init__(msg, **details)
        self.retryable = retryable
