# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the one exception type that library code raises.

Library code in plugins/module_utils never calls fail_json; it raises LanyardError with a message
that names the object, the cause and the fix. The module runner turns it into fail_json.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class LanyardError(Exception):
    """A failure a user can act on. ``details`` are extra keys returned with fail_json (no secrets)."""

    def __init__(self, msg, **details):
        super(LanyardError, self).__init__(msg)
        self.msg = msg
        self.details = details
