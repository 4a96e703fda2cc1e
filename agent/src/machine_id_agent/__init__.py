# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""machine-id-agent: a small Teleport Machine ID renewal agent for Kubernetes outputs."""

__version__ = "0.1.0"
