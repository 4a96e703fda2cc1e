# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the unit tests need from ansible-core, on every version the collection supports (2.16 and later).

``patch_module_args`` arrived in ansible-core 2.19 (``ansible.module_utils.testing``); before that a module read
its arguments from ``ansible.module_utils.basic._ANSIBLE_ARGS``, which is what the stand-in sets."""

from __future__ import annotations

import contextlib
import json

try:
    from ansible.module_utils.testing import patch_module_args  # ansible-core >= 2.19
except ImportError:  # 2.16 - 2.18
    from ansible.module_utils import basic as _basic

    @contextlib.contextmanager
    def patch_module_args(args):
        old = _basic._ANSIBLE_ARGS
        _basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode()
        try:
            yield
        finally:
            _basic._ANSIBLE_ARGS = old

__all__ = ["patch_module_args"]
