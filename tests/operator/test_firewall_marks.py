"""Firewall-mark VirtualServers need a cluster-level grant (issue 8): an AddressPool lists the
mark for the namespace, and one VirtualServer per family holds it."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import condition, get_vs, wait_for

#: Marks no other test uses (the bed and its operator are shared).
_marks = itertools.count(0x100, 0x10)


def marked_vs(name: str, mark: int, **spec: Any) -> dict[str, Any]:
    body = harness.virtual_server(name, fwmark=mark, **spec)
    del body["spec"]["ports"]
    return body


def create(api: Any, ns: str, body: dict[str, Any]) -> None:
    harness.custom(api).create_namespaced_custom_object(
        harness.GROUP, harness.VERSION, ns, "virtualservers", body
    )


def judged(api: Any, ns: str, name: str) -> dict[str, Any] | None:
    vs = get_vs(api, ns, name)
    cond = condition(vs, "AddressAllocated")
    generation = (vs or {}).get("metadata", {}).get("generation")
    return vs if cond and cond.get("observedGeneration") == generation else None


def test_a_pool_cannot_grant_a_mark_with_the_masquerade_bit(admin: Any) -> None:
    body = harness.address_pool(
        "masquerade-bit", None, firewallMarks=[{"first": 8000, "last": 8200}]
    )
    with pytest.raises(ApiException) as info:
        harness.custom(admin).create_cluster_custom_object(
            harness.GROUP, harness.VERSION, "addresspools", body
        )
    assert info.value.status == 422
    status = json.loads(info.value.body or "{}")
    causes = {c.get("field"): c.get("message", "") for c in status["details"]["causes"]}
    assert "0x2000 (8192)" in causes["spec.firewallMarks[0]"]


def test_a_mark_needs_a_pool_that_grants_it_and_one_holder(
    admin: Any, ns: str, other_ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    mark = next(_marks)
    pool_name, _ = pool(
        name=f"{other_ns}-marks",
        addresses=None,
        namespaces=[other_ns],
        firewallMarks=[{"first": mark}],
    )
    # Not granted to this namespace: nothing to program.
    create(admin, ns, marked_vs("uninvited", mark))
    refused = wait_for("uninvited judged", lambda: judged(admin, ns, "uninvited"))
    cond = condition(refused, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("False", "FirewallMarkNotAdmitted")
    assert "firewallMark" not in refused["status"]
    assert condition(refused, "Ready")["status"] == "False"
    wait_for(
        "a FirewallMarkNotAdmitted Event",
        lambda: (
            ("Warning", "FirewallMarkNotAdmitted")
            in [e[:2] for e in harness.events(admin, ns, name="uninvited")]
        ),
    )
    # Granted: admitted, the mark in status for the agents.
    create(admin, other_ns, marked_vs("first", mark))
    first = wait_for("first judged", lambda: judged(admin, other_ns, "first"))
    cond = condition(first, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("True", "FirewallMarkAdmitted")
    assert pool_name in cond["message"]
    assert (first["status"]["firewallMark"], first["status"]["addressPool"]) == (mark, pool_name)
    # A second VirtualServer of the family with that mark: refused, the first keeps it.
    create(admin, other_ns, marked_vs("second", mark))
    second = wait_for("second judged", lambda: judged(admin, other_ns, "second"))
    cond = condition(second, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("False", "AddressConflict")
    assert f"VirtualServer {other_ns}/first" in cond["message"]
    assert "firewallMark" not in second["status"]
    assert get_vs(admin, other_ns, "first") == first
    # The other family's service of that mark is another kernel service.
    create(
        admin,
        other_ns,
        marked_vs(
            "six",
            mark,
            ipFamily="IPv6",
            backends={"static": [{"address": "2001:db8::10"}]},
        ),
    )
    six = wait_for("six judged", lambda: judged(admin, other_ns, "six"))
    assert six["status"]["firewallMark"] == mark
    # The holder goes: the waiting one gets the mark.
    harness.custom(admin).delete_namespaced_custom_object(
        harness.GROUP, harness.VERSION, other_ns, "virtualservers", "first"
    )
    wait_for(
        "the mark to pass to the waiting object",
        lambda: (
            (get_vs(admin, other_ns, "second") or {}).get("status", {}).get("firewallMark") == mark
        ),
    )


def test_a_granted_mark_survives_its_pool_being_deleted_and_applied_again(
    admin: Any,
    ns: str,
    pool: PoolFactory,
    record: Callable[..., harness.Recorder],
    operator: harness.Operator,
) -> None:
    mark = next(_marks)
    name, _ = pool(addresses=None, firewallMarks=[{"first": mark}])
    custom = harness.custom(admin)
    body = custom.get_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", name)
    create(admin, ns, marked_vs("web", mark))
    wait_for(
        "the mark admitted",
        lambda: (get_vs(admin, ns, "web") or {}).get("status", {}).get("firewallMark") == mark,
    )
    seen = record(
        custom.list_namespaced_custom_object, harness.GROUP, harness.VERSION, ns, "virtualservers"
    )

    def reason() -> str:
        return str(condition(get_vs(admin, ns, "web"), "AddressAllocated").get("reason"))

    custom.delete_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", name)
    wait_for("FirewallMarkRetained", lambda: reason() == "FirewallMarkRetained")
    custom.create_cluster_custom_object(
        harness.GROUP,
        harness.VERSION,
        "addresspools",
        {**harness.address_pool(name, None), "spec": body["spec"]},
    )
    wait_for("FirewallMarkAdmitted again", lambda: reason() == "FirewallMarkAdmitted")
    written = [obj for kind, obj in seen.stop() if kind != "DELETED"]
    assert len(written) >= 2
    assert all((obj.get("status") or {}).get("firewallMark") == mark for obj in written), written
