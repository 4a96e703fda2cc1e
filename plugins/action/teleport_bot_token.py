# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin for lanyard.machine_id.teleport_bot_token: the token-hiding wrapper of teleport_bot.

Its result carries the minted token, so it is hidden the same way (see plugins/action/teleport_bot.py).
"""

from __future__ import annotations

from ansible_collections.lanyard.machine_id.plugins.action.teleport_bot import ActionModule

__all__ = ["ActionModule"]
