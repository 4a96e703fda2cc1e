# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the one exit point of every module.

A module's ``main()`` builds its AnsibleModule and hands a function to :func:`run_module`. That
function returns the result dict; library code signals a user-actionable failure by raising
:class:`LanyardError`. ``run_module`` turns the error into ``fail_json`` (no traceback for a
user mistake) and the result into ``exit_json``, dropping ``diff`` unless ``--diff`` is on.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError


def run_module(module, action):
    """Run ``action(module) -> dict`` and exit the module exactly once."""
    try:
        result = action(module)
    except LanyardError as exc:
        module.fail_json(msg=exc.msg, changed=False, **exc.details)
    result = dict(result or {})
    result.setdefault("changed", False)
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)
