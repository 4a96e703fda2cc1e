# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Normalisation, comparison and diff of declared vs. stored Teleport resources."""

from __future__ import annotations

import json

import pytest

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_resource import (
    build_role,
    format_duration,
    parse_duration,
    role_diff,
    role_matches,
    strip_volatile,
    values_equal,
)

from conftest import recorded

GUIDE_SPEC = {
    "allow": {
        "kubernetes_labels": {"*": "*"},
        "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}],
        "kubernetes_groups": ["example"],
        "kubernetes_users": ["alice"],
    }
}


@pytest.mark.parametrize("text,seconds", [("8h", 28800), ("8h0m0s", 28800), ("1h30m", 5400), ("90s", 90),
                                          ("1.5h", 5400), ("500ms", 0.5), ("0s", 0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "8", "h", "8x", "abc", None, 5, "8h junk"])
def test_parse_duration_rejects(text):
    assert parse_duration(text) is None


def test_format_duration():
    assert format_duration(28800) == "8h"
    assert format_duration(5400) == "1h30m"
    assert format_duration(61) == "1m1s"
    assert format_duration(0) == "0s"


def test_values_equal_rules():
    assert values_equal("8h", "8h0m0s")
    assert not values_equal("8h", "9h0m0s")
    assert values_equal({"*": "*"}, {"*": ["*"]}, key="kubernetes_labels")
    assert not values_equal({"*": "*"}, {"*": ["*"], "env": ["x"]}, key="kubernetes_labels")
    assert values_equal({"a": 1}, {"a": 1, "b": 2})          # only declared keys count
    assert not values_equal({"a": 1, "c": 3}, {"a": 1, "b": 2})
    assert values_equal([], None) and values_equal(None, [])
    assert not values_equal(["a"], None)
    assert not values_equal(["a", "b"], ["b", "a"])            # order of lists is kept
    assert values_equal([{"kind": "pod"}], [{"kind": "pod", "verbs": ["*"]}])
    assert not values_equal(True, "true")
    assert not values_equal(1, True)


def test_guide_role_round_trips_against_the_v13_server_form():
    declared = build_role("machine-id-kube-role", spec=GUIDE_SPEC)
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    assert role_matches(declared, stored)


def test_changed_field_is_detected():
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    spec = json.loads(json.dumps(GUIDE_SPEC))
    spec["allow"]["kubernetes_groups"] = ["other"]
    assert not role_matches(build_role("machine-id-kube-role", spec=spec), stored)
    # role version is part of the declaration
    assert not role_matches(build_role("machine-id-kube-role", spec=GUIDE_SPEC, version="v5"), stored)


def test_build_role_from_resource_and_errors():
    res = {"kind": "role", "version": "v6", "metadata": {"name": "r"}, "spec": GUIDE_SPEC}
    assert build_role("r", resource=res)["spec"] == GUIDE_SPEC
    assert build_role("r", resource={"spec": GUIDE_SPEC})["metadata"]["name"] == "r"
    with pytest.raises(LanyardError, match="metadata.name is 'other'"):
        build_role("r", resource={"metadata": {"name": "other"}, "spec": {}})
    with pytest.raises(LanyardError, match="kind 'user'"):
        build_role("r", resource={"kind": "user", "spec": {}})
    with pytest.raises(LanyardError, match="unknown spec key"):
        build_role("r", spec={"allow": {}, "alow": {}})
    with pytest.raises(LanyardError, match="spec must be a dict"):
        build_role("r", spec=None)


def test_diff_overlays_declared_keys_on_the_server_role():
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    spec = json.loads(json.dumps(GUIDE_SPEC))
    spec["allow"]["kubernetes_users"] = ["bob"]
    before, after = role_diff(build_role("machine-id-kube-role", spec=spec), stored)
    assert before["spec"]["allow"]["kubernetes_users"] == ["alice"]
    assert after["spec"]["allow"]["kubernetes_users"] == ["bob"]
    # server defaults stay visible on both sides, server-owned metadata on neither
    assert before["spec"]["options"] == after["spec"]["options"]
    assert "revision" not in before["metadata"] and "id" not in after["metadata"]


def test_strip_volatile_keeps_labels():
    res = {"metadata": {"name": "x", "id": 1, "revision": "abc", "labels": {"a": "b"}}, "status": {}}
    assert strip_volatile(res) == {"metadata": {"name": "x", "labels": {"a": "b"}}}


def test_wait_for_polls_until_done_or_timeout():
    from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_wait import wait_for
    now = {"t": 0.0}
    values = iter(["old", "old", "new", "newer"])
    slept = []

    def sleep(s):
        slept.append(s)
        now["t"] += s

    assert wait_for(lambda: next(values), lambda v: v == "new", timeout=5, interval=1, sleep=sleep,
                    clock=lambda: now["t"]) == "new"
    assert slept == [1, 1]
    stale = iter(["old"] * 10)
    assert wait_for(lambda: next(stale), lambda v: v == "new", timeout=2, interval=1, sleep=sleep,
                    clock=lambda: now["t"]) == "old"
