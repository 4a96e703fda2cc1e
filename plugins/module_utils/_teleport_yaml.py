# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: YAML text for --diff output (JSON when PyYAML is missing on the host)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

from ansible.module_utils.common.yaml import HAS_YAML, yaml_dump


def to_yaml(data):
    if not data:
        return ""
    if HAS_YAML:
        return yaml_dump(data, default_flow_style=False, sort_keys=True)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
