# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logging for a service under journald: one line per record, a level prefix, no timestamp when
``JOURNAL_STREAM`` is set (journald adds its own), and a redaction filter for secrets."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Iterable, List

LOGGER = "machine_id_agent"
_PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)
# kernel log levels as understood by journald's "<N>" prefix (sd-daemon.h)
_SD_PREFIX = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>",
              logging.CRITICAL: "<2>"}


class Redactor(logging.Filter):
    """Replaces registered secrets (the join token) and any PEM block with a placeholder."""

    def __init__(self):
        super().__init__()
        self.secrets: List[str] = []

    def add(self, values: Iterable[str]) -> None:
        for v in values:
            if v and len(v) >= 4 and v not in self.secrets:
                self.secrets.append(v)

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "<redacted>")
        if "-----BEGIN " in text:
            text = _PEM_RE.sub("<redacted PEM>", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = self.scrub(msg)
        if record.exc_info:
            # tracebacks are for bugs only; keep them but scrubbed
            import traceback
            clean += "\n" + self.scrub("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
            record.exc_text = None
        record.msg = " | ".join(clean.splitlines()) if not record.levelno <= logging.DEBUG else clean
        record.args = ()
        return True


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        msg = record.getMessage()
        if self.journal:
            return "%s%s: %s" % (_SD_PREFIX.get(record.levelno, "<6>"), level, msg)
        return "%s %s: %s" % (self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), level, msg)


REDACTOR = Redactor()


def setup(debug: bool = False, stream=None) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    handler.addFilter(REDACTOR)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    return log


def get() -> logging.Logger:
    return logging.getLogger(LOGGER)
