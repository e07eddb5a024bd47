"""rbac/*.yaml on the real API server: a matrix of allowed and denied verbs per ServiceAccount.

The operator's rules are also proven sufficient by every other test in this package, which
runs the operator as the ``ipvs-operator`` ServiceAccount; this matrix proves they are not
more than that, and gives the agent's rules (whose program is not run here) a real write.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import LocalApiServer
from tests.operator import harness
from tests.operator.harness import wait_for

SYSTEM = harness.OPERATOR_NAMESPACE
#: (verb, group, resource, subresource, namespace, name)
Check = tuple[str, str, str, str, str, str]

OPERATOR_ALLOWED: list[Check] = [
    *[(v, "", "services", "", "", "") for v in ("list", "watch")],
    ("patch", "", "services", "status", "shop", "web"),
    *[(v, "discovery.k8s.io", "endpointslices", "", "", "") for v in ("list", "watch")],
    *[(v, "", r, "", "", "") for v in ("list", "watch") for r in ("nodes", "namespaces")],
    *[
        (v, "ipvs.io", "virtualservers", "", "shop", "")
        for v in ("list", "watch", "create", "patch", "delete")
    ],
    ("patch", "ipvs.io", "virtualservers", "status", "shop", "web"),
    ("patch", "ipvs.io", "addresspools", "status", "", "default"),
    *[
        (v, "ipvs.io", r, "", "", "")
        for v in ("list", "watch")
        for r in ("addresspools", "bgppeers", "ipvsnodes", "ipvsnodereports")
    ],
    ("create", "", "events", "", "shop", ""),
    *[
        (v, "apiextensions.k8s.io", "customresourcedefinitions", "", "", "")
        for v in ("list", "watch")
    ],
    ("create", "coordination.k8s.io", "leases", "", SYSTEM, ""),
    ("get", "coordination.k8s.io", "leases", "", SYSTEM, "ipvs-operator"),
    ("update", "coordination.k8s.io", "leases", "", SYSTEM, "ipvs-operator"),
    *[(v, "coordination.k8s.io", "leases", "", SYSTEM, "") for v in ("list", "watch")],
]

OPERATOR_DENIED: list[Check] = [
    *[
        (v, "", "services", "", "shop", "web")
        for v in ("get", "create", "update", "patch", "delete")
    ],
    ("update", "", "services", "status", "shop", "web"),
    *[(v, "", "secrets", "", "shop", "") for v in ("get", "list")],
    ("list", "", "pods", "", "", ""),
    ("list", "", "configmaps", "", "", ""),
    ("patch", "", "nodes", "", "", "n1"),
    ("delete", "", "events", "", "shop", ""),
    ("update", "ipvs.io", "virtualservers", "", "shop", "web"),
    ("update", "ipvs.io", "virtualservers", "status", "shop", "web"),
    *[(v, "ipvs.io", "addresspools", "", "", "default") for v in ("create", "patch", "delete")],
    *[(v, "ipvs.io", "ipvsnodes", "", "", "n1") for v in ("create", "patch", "delete")],
    ("patch", "ipvs.io", "ipvsnodes", "status", "", "n1"),
    *[(v, "ipvs.io", "ipvsnodereports", "", "", "n1.1") for v in ("create", "patch", "delete")],
    *[(v, "ipvs.io", "bgppeers", "", "", "tor-a") for v in ("create", "patch", "delete")],
    ("update", "coordination.k8s.io", "leases", "", SYSTEM, "someone-else"),
    ("delete", "coordination.k8s.io", "leases", "", SYSTEM, "ipvs-agent-n1"),
    ("list", "coordination.k8s.io", "leases", "", "kube-system", ""),
    ("get", "coordination.k8s.io", "leases", "", "kube-system", "ipvs-operator"),
    ("create", "coordination.k8s.io", "leases", "", "kube-system", ""),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", "", "", ""),
]

AGENT_ALLOWED: list[Check] = [
    *[
        (v, g, r, "", "", "")
        for v in ("get", "list", "watch")
        for g, r in (
            ("ipvs.io", "virtualservers"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "nodes"),
        )
    ],
    *[(v, "ipvs.io", "ipvsnodes", "", "", "n1") for v in ("create", "get", "patch")],
    *[(v, "ipvs.io", "ipvsnodes", "status", "", "n1") for v in ("get", "patch")],
    *[
        (v, "ipvs.io", "ipvsnodereports", "", "", "n1.1")
        for v in ("create", "get", "patch", "delete")
    ],
    *[(v, "apps", "daemonsets", "", SYSTEM, "ipvs-agent") for v in ("get", "list", "watch")],
    *[(v, "ipvs.io", "addresspools", "", "", "") for v in ("list", "watch")],
    *[(v, "ipvs.io", "bgppeers", "", "", "") for v in ("list", "watch")],
    ("get", "", "secrets", "", SYSTEM, "bgp-tor-a"),  # BGP passwords, by name
    *[(v, "coordination.k8s.io", "leases", "", SYSTEM, "") for v in ("list", "watch", "create")],
    *[
        (v, "coordination.k8s.io", "leases", "", SYSTEM, "ipvs-agent-n1")
        for v in ("get", "update", "delete")
    ],
]

AGENT_DENIED: list[Check] = [
    ("get", "apps", "daemonsets", "", SYSTEM, "ipvs-operator"),
    ("list", "apps", "daemonsets", "", SYSTEM, ""),
    ("get", "apps", "daemonsets", "", "kube-system", "ipvs-agent"),
    *[(v, "apps", "daemonsets", "", SYSTEM, "ipvs-agent") for v in ("patch", "delete")],
    *[(v, "ipvs.io", "virtualservers", "", "shop", "web") for v in ("create", "patch", "delete")],
    ("patch", "ipvs.io", "virtualservers", "status", "shop", "web"),
    *[(v, "ipvs.io", "ipvsnodes", "", "", "n1") for v in ("update", "delete")],
    ("list", "ipvs.io", "ipvsnodes", "", "", ""),
    *[(v, "ipvs.io", "ipvsnodereports", "", "", "") for v in ("list", "watch")],
    ("update", "ipvs.io", "ipvsnodes", "status", "", "n1"),
    *[(v, "ipvs.io", "addresspools", "", "", "default") for v in ("create", "patch", "delete")],
    ("list", "coordination.k8s.io", "leases", "", "kube-system", ""),
    *[(v, "", "services", "", "", "") for v in ("get", "list")],
    ("patch", "", "nodes", "", "", "n1"),
    ("get", "", "secrets", "", "shop", ""),
    *[(v, "", "secrets", "", SYSTEM, "") for v in ("list", "watch")],
    *[(v, "", "secrets", "", SYSTEM, "bgp-tor-a") for v in ("update", "patch", "delete")],
    *[(v, "ipvs.io", "bgppeers", "", "", "tor-a") for v in ("create", "patch", "delete")],
    ("list", "", "pods", "", "", ""),
    ("create", "", "events", "", "shop", ""),
    # Leases of the release namespace are the agents' own for layer-2 announcement; RBAC cannot
    # limit them to ipvs-agent-*, so the operator's Lease there is not protected from them
    # (as Cilium's agents may write kube-system's leader Leases; docs/operations.md).
    ("patch", "coordination.k8s.io", "leases", "", SYSTEM, "ipvs-agent-n1"),
]


def allowed(api: Any, check: Check) -> bool:
    verb, group, resource, subresource, namespace, name = check
    attributes = {"verb": verb, "group": group, "resource": resource}
    for key, value in (("subresource", subresource), ("namespace", namespace), ("name", name)):
        if value:
            attributes[key] = value
    review = harness.authorization(api).create_self_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
    )
    return bool(review.status.allowed)


def describe(check: Check) -> str:
    verb, group, resource, sub, namespace, name = check
    target = f"{group or 'core'}/{resource}{'/' + sub if sub else ''}"
    return (
        f"{verb} {target}"
        + (f" in {namespace}" if namespace else "")
        + (f" ({name})" if name else "")
    )


@pytest.mark.parametrize(
    ("account", "allow", "deny"),
    [
        (harness.OPERATOR_SA, OPERATOR_ALLOWED, OPERATOR_DENIED),
        (harness.AGENT_SA, AGENT_ALLOWED, AGENT_DENIED),
    ],
)
def test_verb_matrix(
    bed: LocalApiServer, account: str, allow: list[Check], deny: list[Check]
) -> None:
    with bed.client_for_service_account(SYSTEM, account, create=False) as api:
        # The authorizer reads RBAC from an informer: wait for the first grant to land.
        wait_for(f"{account}'s grants", lambda: allowed(api, allow[0]), timeout=15)
        wrong_allowed = [describe(c) for c in deny if allowed(api, c)]
        wrong_denied = [describe(c) for c in allow if not allowed(api, c)]
    assert wrong_denied == [], f"{account} lacks what it needs"
    assert wrong_allowed == [], f"{account} may do more than it needs"


def test_agent_account_writes_its_ipvsnode_and_nothing_more(bed: LocalApiServer) -> None:
    name = "rbac-probe-node"
    with bed.client_for_service_account(SYSTEM, harness.AGENT_SA, create=False) as api:
        custom = harness.custom(api)
        body = {"apiVersion": "ipvs.io/v1alpha1", "kind": "IPVSNode", "metadata": {"name": name}}
        wait_for("the agent's grants", lambda: allowed(api, AGENT_ALLOWED[-1]), timeout=15)
        custom.create_cluster_custom_object(harness.GROUP, harness.VERSION, "ipvsnodes", body)
        custom.patch_cluster_custom_object_status(
            harness.GROUP,
            harness.VERSION,
            "ipvsnodes",
            name,
            {"status": {"agentVersion": "probe", "virtualServers": []}},
        )
        read = custom.get_cluster_custom_object(harness.GROUP, harness.VERSION, "ipvsnodes", name)
        assert read["status"]["agentVersion"] == "probe"
        with pytest.raises(ApiException) as denied:
            custom.delete_cluster_custom_object(harness.GROUP, harness.VERSION, "ipvsnodes", name)
        assert denied.value.status == 403
    with bed.api_client() as admin:
        harness.custom(admin).delete_cluster_custom_object(
            harness.GROUP, harness.VERSION, "ipvsnodes", name
        )


def test_agent_account_sees_its_daemonset_go_and_so_knows_it_is_uninstalled(
    bed: LocalApiServer,
) -> None:
    """``ipvs-agent run --daemonset`` cleans its node only when its DaemonSet is deleted (helm
    uninstall), never on a restart: its watch, with its own grants, must see both."""
    import threading

    from ipvs_agent.__main__ import _uninstalling
    from ipvs_agent.cluster import daemon_set_mirror

    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "ipvs-agent", "namespace": SYSTEM},
        "spec": {
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {
                "metadata": {"labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "c", "image": "example.invalid/x"}]},
            },
        },
    }
    with bed.api_client() as admin:
        harness.apps(admin).create_namespaced_daemon_set(SYSTEM, daemonset)
    stop = threading.Event()
    with bed.client_for_service_account(SYSTEM, harness.AGENT_SA, create=False) as api:
        mirror = daemon_set_mirror(api, SYSTEM, "ipvs-agent", threading.Event())
        thread = threading.Thread(target=mirror.run, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_for("the mirror synced", mirror.synced.is_set, timeout=30)
            assert not _uninstalling(mirror, wait=0.5), "a restart leaves the node as it is"
            with bed.api_client() as admin:
                harness.apps(admin).delete_namespaced_daemon_set("ipvs-agent", SYSTEM)
            assert _uninstalling(mirror, wait=10), "the deletion reaches the agent"
        finally:
            stop.set()
            mirror.stop()
