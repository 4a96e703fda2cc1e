# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``machine-id-agent`` console script: ``kube credentials`` (kubectl runs it for every call through an
exec-plugin kubeconfig) goes to :mod:`machine_id_agent.kubecreds` without importing the rest of the command line;
everything else to :mod:`machine_id_agent.cli`."""

from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:2] == ["kube", "credentials"]:
        from machine_id_agent import kubecreds
        return kubecreds.main(args[2:])
    from machine_id_agent import cli
    return cli.main(args)
