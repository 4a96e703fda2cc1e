# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Normalisation, comparison and diff of declared vs. stored Teleport resources."""

from __future__ import annotations

import json

import pytest

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_resource import (
    ROLE_OPTION_DEFAULTS,
    build_role,
    canonical_role,
    changed_paths,
    format_duration,
    go_duration,
    parse_duration,
    role_diff,
    role_matches,
    strip_volatile,
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


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (30 * 3600, "30h0m0s"), (8 * 3600, "8h0m0s"), (90, "1m30s"),
                                          (30, "30s"), (1.5, "1.5s"), (0.5, "500ms"), (3601, "1h0m1s")])
def test_go_duration_is_gos_form(seconds, text):
    assert go_duration(seconds) == text


def test_canonical_form_rules():
    role = canonical_role({"version": "v6", "metadata": {"name": "r", "id": 5, "namespace": "default"},
                           "spec": {"allow": {"kubernetes_labels": {"*": ["*"], "env": ["a", "b"]},
                                              "kubernetes_users": [], "logins": None},
                                    "deny": {}, "options": {"max_session_ttl": "8h"}}})
    assert role["metadata"] == {"name": "r"}                        # server-owned metadata left out
    assert role["spec"]["allow"] == {"kubernetes_labels": {"*": "*", "env": ["a", "b"]}}   # one value -> string
    assert "deny" not in role["spec"]                                # empty values dropped
    assert role["spec"]["options"]["max_session_ttl"] == "8h0m0s"   # Go's duration form
    assert role["spec"]["options"]["cert_format"] == "standard"     # Teleport's defaults filled in
    # a non-positive max_session_ttl takes the default, as the server does
    assert canonical_role({"metadata": {"name": "r"}, "spec": {"options": {"max_session_ttl": "0s"}}}
                          )["spec"]["options"]["max_session_ttl"] == "30h0m0s"


def test_v5_role_gets_the_pod_default_only_with_kubernetes_labels():
    v5 = canonical_role({"version": "v5", "metadata": {"name": "r"},
                         "spec": {"allow": {"kubernetes_labels": {"*": "*"}}}})
    assert v5["spec"]["allow"]["kubernetes_resources"] == [{"kind": "pod", "namespace": "*", "name": "*"}]
    v6 = canonical_role({"version": "v6", "metadata": {"name": "r"},
                         "spec": {"allow": {"kubernetes_labels": {"*": "*"}}}})
    assert "kubernetes_resources" not in v6["spec"]["allow"]


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


def test_diff_is_server_before_and_written_role_after():
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    spec = json.loads(json.dumps(GUIDE_SPEC))
    spec["allow"]["kubernetes_users"] = ["bob"]
    before, after = role_diff(build_role("machine-id-kube-role", spec=spec), stored)
    assert before["spec"]["allow"]["kubernetes_users"] == ["alice"]
    assert after["spec"]["allow"]["kubernetes_users"] == ["bob"]
    # server defaults on both sides (the write keeps them), server-owned metadata on neither
    assert before["spec"]["options"] == after["spec"]["options"]
    assert "id" not in before["metadata"] and "id" not in after["metadata"]
    assert changed_paths(before, after) == ["spec.allow.kubernetes_users (changed)"]


def test_dropped_keys_are_a_change_and_leave_the_diff():
    """Issue 13: dropping kubernetes_users or the whole deny block used to report changed=false."""
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    stored["spec"]["deny"] = {"kubernetes_groups": ["system:masters"], "node_labels": {"env": "prod"}}
    spec = json.loads(json.dumps(GUIDE_SPEC))
    del spec["allow"]["kubernetes_users"]
    declared = build_role("machine-id-kube-role", spec=spec)
    assert not role_matches(declared, stored)
    before, after = role_diff(declared, stored)
    assert before["spec"]["allow"]["kubernetes_users"] == ["alice"] and before["spec"]["deny"]
    assert "kubernetes_users" not in after["spec"]["allow"] and "deny" not in after["spec"]
    assert changed_paths(before, after) == ["spec.allow.kubernetes_users (removed)", "spec.deny (removed)"]
    # an option the server holds and the task does not name goes back to Teleport's default
    stored2 = json.loads(recorded("v13_get_role_guide.json"))[0]
    stored2["spec"]["options"]["max_session_ttl"] = "8h0m0s"
    before, after = role_diff(build_role("machine-id-kube-role", spec=GUIDE_SPEC), stored2)
    assert after["spec"]["options"]["max_session_ttl"] == ROLE_OPTION_DEFAULTS["max_session_ttl"]
    assert changed_paths(before, after) == ["spec.options.max_session_ttl (changed)"]


def test_declared_defaults_and_other_forms_are_no_change():
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    spec = json.loads(json.dumps(GUIDE_SPEC))
    spec["allow"]["kubernetes_labels"] = {"*": ["*"]}
    spec["deny"] = {}
    spec["options"] = {"max_session_ttl": "30h", "cert_format": "standard", "forward_agent": False}
    assert role_matches(build_role("machine-id-kube-role", spec=spec), stored)


def test_labels_and_description_are_desired_state_too():
    stored = json.loads(recorded("v13_get_role_guide.json"))[0]
    stored["metadata"]["labels"] = {"team": "a"}
    assert not role_matches(build_role("machine-id-kube-role", spec=GUIDE_SPEC), stored)
    assert role_matches(build_role("machine-id-kube-role", spec=GUIDE_SPEC, labels={"team": "a"}), stored)


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


ROLE_DEFAULTS = json.loads(recorded("v13_role_defaults.json"))


def _without_empties(value):
    if isinstance(value, dict):
        out = {k: _without_empties(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_without_empties(v) for v in value]
    return value


@pytest.mark.parametrize("case", sorted(ROLE_DEFAULTS))
def test_prediction_equals_what_v13_stored(case):
    """Roles created on the real v13.3.8 (recorded): the predicted role is exactly the stored one, so Teleport's
    defaults never read as a change."""
    declared, stored = ROLE_DEFAULTS[case]["declared"], ROLE_DEFAULTS[case]["stored"]
    assert role_matches(declared, stored)
    predicted = canonical_role(declared)
    server = _without_empties(strip_volatile(stored))
    if case in ("v6-recsess-empty", "v6-idp-empty"):
        # an option given as {} is stored as nulls; both sides read it as "not set" (the default)
        assert canonical_role(stored) == predicted
    else:
        assert predicted == server, (predicted, server)


def test_namespaces_are_ignored_like_the_server_does():
    stored = ROLE_DEFAULTS["v6-nsempty"]["stored"]
    declared = {"metadata": {"name": stored["metadata"]["name"]}, "version": "v6",
                "spec": {"allow": {"namespaces": ["default"]}, "deny": {"namespaces": ["default"]}}}
    assert role_matches(declared, stored)
