"""Workload identity end to end: real cgroup layouts built under the test's root (names as
kubelet, containerd, CRI-O, Docker and systemd create them), real processes in them, a real agent
and, for Kubernetes, the fake API server speaking the real list/watch protocol. Each test checks
the verdict the process saw and the identity its event carries."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.harness import wait_for
from tests.kubeapi import FakeKubeAPI

pytestmark = pytest.mark.privileged

NODE = "test-node"
POD_UID = "3f1c5a2e-8d4b-4c7a-9e21-0b6d7f5a9c11"
CONTAINER_ID = "7d1a" + "0123456789abcdef" * 3 + "0a1b2c3d4e5f"
DOCKER_ID = "9e8d" + "fedcba9876543210" * 3 + "aabbccddeeff"
POD_SLICE = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice"


def pod_cgroup(uid: str) -> str:
    return POD_SLICE.format(uid.replace("-", "_"))


def container_cgroup(uid: str, cid: str) -> str:
    return f"{pod_cgroup(uid)}/cri-containerd-{cid}.scope"


def doc(name: str, selector: str, egress: str = "") -> str:
    """A policy document; selector and egress are YAML blocks indented for their place."""
    return (f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n"
            f"spec:\n  selector:\n{selector}\n  egress:\n{egress or '    []'}\n")


def allow(port: int) -> str:
    return f"    - name: web\n      to: [{{cidr: 127.0.0.2/32}}]\n      ports: [{{port: {port}}}]"


@pytest.fixture
def listener(node):
    w = node.workload(None)
    w.ports = {"ok": w.do("listen_tcp", host="127.0.0.2")["port"],
               "other": w.do("listen_tcp", host="127.0.0.2")["port"]}
    return w


@pytest.fixture
def kube(node, tmp_path):
    with FakeKubeAPI() as api:
        api.add_namespace("payments", {"team": "pay"})
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        api.node_config = {"enabled": True, "kubeconfig": kubeconfig, "nodeName": NODE}
        node.write_config(kubernetes=api.node_config)
        yield api


def test_systemd_service_selected_by_unit_name(node, listener):
    p = listener.ports
    node.write_policy("u", doc("agents", '    systemdUnit: "agent-*.service"', allow(p["ok"])))
    w = node.workload("system.slice/agent-summarizer.service")
    other = node.workload("system.slice/cron.service")
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM"
    assert other.verdict("connect", host="127.0.0.2", port=p["other"]) == "ok"
    e = node.wait_event(verdict="deny", workload__unit="agent-summarizer.service")
    wl = e["workload"]
    assert e["policy"] == "agents"
    assert wl["kind"] == "service"
    assert wl["cgroup_path"] == "/system.slice/agent-summarizer.service"
    assert wl["spiffe_id"] == f"spiffe://cluster.local/node/{os.uname().nodename}/unit/agent-summarizer.service"
    assert wl["pid"] == w.pid
    assert wl["exe"] and os.path.basename(wl["exe"]).startswith("python")
    assert wl["namespace"] is None and wl["pod"] is None


def test_docker_container_outside_kubernetes_selected_by_id(node, listener):
    p = listener.ports
    node.write_policy("c", doc("one-container", f"    container: {{id: {DOCKER_ID[:12]}}}",
                               allow(p["ok"])))
    w = node.workload(f"system.slice/docker-{DOCKER_ID}.scope")
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM"
    e = node.wait_event(verdict="deny", policy="one-container")
    assert e["workload"]["kind"] == "container"
    assert e["workload"]["container_id"] == DOCKER_ID
    assert e["workload"]["runtime"] == "docker"
    assert e["workload"]["spiffe_id"].endswith(f"/container/{DOCKER_ID}")


def test_kubernetes_pod_policy_identity_and_label_change(node, listener, kube):
    p = listener.ports
    kube.add_pod("payments", "summarizer-7f9c", node=NODE, uid=POD_UID,
                 labels={"app": "summarizer"}, service_account="agent-runner",
                 containers=[("main", f"containerd://{CONTAINER_ID}")])
    node.write_policy("k", doc("summarizer", "    kubernetes:\n      namespace: payments\n"
                               "      podSelector: {matchLabels: {app: summarizer}}",
                               allow(p["ok"])))
    w = node.workload(container_cgroup(POD_UID, CONTAINER_ID))
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM"
    e = node.wait_event(verdict="deny", policy="summarizer")
    wl = e["workload"]
    assert (wl["kind"], wl["namespace"], wl["pod"], wl["pod_uid"]) == \
        ("container", "payments", "summarizer-7f9c", POD_UID)
    assert (wl["container"], wl["container_id"]) == ("main", CONTAINER_ID)
    assert wl["service_account"] == "agent-runner"
    assert wl["labels"] == {"app": "summarizer"}
    assert wl["spiffe_id"] == "spiffe://cluster.local/ns/payments/sa/agent-runner"
    assert wl["cgroup_path"] == "/" + container_cgroup(POD_UID, CONTAINER_ID)

    # relabelled: the policy no longer selects the pod, the node default (allow) applies
    kube.update_pod(POD_UID, labels={"app": "other"})
    wait_for(lambda: w.verdict("connect", host="127.0.0.2", port=p["other"]) == "ok", 5,
             "label change to rebind the pod")
    # and back: governed again, without a reload
    kube.update_pod(POD_UID, labels={"app": "summarizer"})
    wait_for(lambda: w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM", 5,
             "label change to rebind the pod again")
    status = json.loads((node.tmp / "state" / "status.json").read_text())
    assert status["identity"]["kubernetes"] == "synced"
    assert status["identity"]["pods"] == 1


def test_unknown_pod_gets_pending_action_until_its_metadata_arrives(node, listener, kube):
    p = listener.ports
    node.write_policy("k", doc("summarizer", "    kubernetes:\n      namespace: payments",
                               allow(p["ok"])))
    w = node.workload(container_cgroup(POD_UID, CONTAINER_ID))
    node.start_agent()
    # the cgroup exists, the API has no such pod yet: pendingAction (deny by default)
    assert w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "EPERM"
    e = node.wait_event(verdict="deny", reason="pending_identity")
    assert e["workload"]["pod_uid"] == POD_UID and e["policy"] is None
    kube.add_pod("payments", "late", node=NODE, uid=POD_UID,
                 containers=[("main", f"containerd://{CONTAINER_ID}")])
    wait_for(lambda: w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "ok", 5,
             "pod metadata to bind the pod to its policy")
    assert w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM"


def test_pending_action_is_configurable(node, listener, kube):
    p = listener.ports
    node.write_config(kubernetes={**kube.node_config, "pendingAction": "audit"})
    node.write_policy("k", doc("summarizer", "    kubernetes:\n      namespace: payments",
                               allow(p["ok"])))
    w = node.workload(pod_cgroup(POD_UID))
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["other"]) == "ok"
    assert node.wait_event(verdict="audit")["reason"] == "pending_identity"


def test_equal_precedence_tie_fails_closed_and_is_reported(node, listener, kube):
    p = listener.ports
    kube.add_pod("payments", "web", node=NODE, uid=POD_UID, labels={"app": "web"})
    node.write_policy("a", doc("by-namespace", "    kubernetes:\n      namespace: payments",
                               allow(p["ok"])))
    node.write_policy("b", doc("by-label", "    kubernetes:\n      podSelector: "
                               "{matchLabels: {app: web}}", allow(p["ok"])))
    w = node.workload(pod_cgroup(POD_UID))
    agent = node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "EPERM"
    assert node.wait_event(verdict="deny")["reason"] == "selector_conflict"
    status = json.loads((node.tmp / "state" / "status.json").read_text())
    assert status["identity"]["conflicts"] == {"/" + pod_cgroup(POD_UID): ["by-label", "by-namespace"]}
    assert "hostagent_selector_conflicts 1.0" in agent.scrape()[1]
    out = node.hostagent("status").stdout
    assert f"CONFLICT /{pod_cgroup(POD_UID)}: denied" in out and "by-label, by-namespace" in out, out
    assert f"Kubernetes pods of node {NODE}: synced, 1 pods" in out, out


def test_new_cgroup_is_bound_from_the_watch_not_the_resync(node, listener):
    p = listener.ports
    node.write_config(resyncInterval=3600)
    node.write_policy("a", doc("agents", '    cgroupPath: "/agents/*"', allow(p["ok"])))
    node.cgroup("agents")
    node.start_agent()
    t0 = time.monotonic()
    w = node.workload("agents/new-one")   # mkdir, then the process joins it
    wait_for(lambda: w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM", 2,
             "the new cgroup to be bound")
    assert time.monotonic() - t0 < 2


def test_no_cluster_means_cgroup_identity_only(node, listener):
    node.write_policy("a", doc("pods", '    cgroupPath: "/kubepods.slice/**"'))
    w = node.workload(container_cgroup(POD_UID, CONTAINER_ID))
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=listener.ports["ok"]) == "EPERM"
    wl = node.wait_event(verdict="deny")["workload"]
    # what the path says, and nothing guessed
    assert (wl["kind"], wl["pod_uid"], wl["container_id"]) == ("container", POD_UID, CONTAINER_ID)
    assert wl["namespace"] is None and wl["pod"] is None and wl["spiffe_id"] is None
    status = json.loads((node.tmp / "state" / "status.json").read_text())
    assert status["identity"]["kubernetes"] == "disabled"
    assert "cgroup-derived identity only" in status["identity"]["note"]
    out = node.hostagent("status").stdout
    assert "identity:    cgroup-derived only" in out, out


def test_container_churn_frees_every_binding(node):
    """10,000 containers come and go: the bindings map returns to its baseline and the agent's
    memory does not grow with them."""
    import psutil

    # the 20,000 workload seen/gone events fill the event replay buffer, which is bounded but
    # large by default: keep it small so that what is measured is per-container growth
    node.write_config(resyncInterval=3600, events={"replayBuffer": 1000})
    node.write_policy("a", doc("pods", '    cgroupPath: "/kubepods.slice/**"'))
    base = node.cgroup(pod_cgroup(POD_UID))
    agent = node.start_agent()
    status_path = node.tmp / "state" / "status.json"

    def bindings() -> int:
        return json.loads(status_path.read_text())["map_fill"]["bindings"][0]

    baseline = wait_for(lambda: bindings() or None, 5, "status")
    proc = psutil.Process(agent.proc.pid)
    rss = []
    for batch in range(20):           # 20 x 500 = 10,000 containers
        names = [f"{base}/cri-containerd-{(batch * 500 + i):064x}.scope" for i in range(500)]
        for n in names:
            os.mkdir(n)
        wait_for(lambda: bindings() == baseline + 500, 10, f"batch {batch} bound")
        for n in names:
            os.rmdir(n)
        wait_for(lambda: bindings() == baseline, 10, f"batch {batch} freed")
        rss.append(proc.memory_info().rss)
    # after warm-up, memory is flat: allow a little allocator noise, not per-container growth
    assert rss[-1] - rss[4] < 8 * 1024 * 1024, rss


def test_static_pod_found_by_its_manifest_hash(node, listener, kube):
    """kubelet names a static pod's cgroup after the manifest hash; the API's mirror pod has
    another uid and carries the hash in an annotation."""
    p = listener.ports
    config_hash = "6c4b2f3e9a1d8b7c5e0f2a4d6b8c0e1f"
    mirror = kube.add_pod("kube-system", "etcd-test-node", node=NODE, labels={"component": "etcd"})
    kube.update_pod(mirror, annotations={"kubernetes.io/config.hash": config_hash,
                                         "kubernetes.io/config.mirror": config_hash,
                                         "kubernetes.io/config.source": "file"})
    node.write_policy("k", doc("etcd", "    kubernetes:\n      namespace: kube-system\n"
                               "      podSelector: {matchLabels: {component: etcd}}",
                               allow(p["ok"])))
    w = node.workload(POD_SLICE.format(config_hash))
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "ok"
    assert w.verdict("connect", host="127.0.0.2", port=p["other"]) == "EPERM"
    wl = node.wait_event(verdict="deny", policy="etcd")["workload"]
    assert (wl["kind"], wl["namespace"], wl["pod"], wl["pending"]) == \
        ("pod", "kube-system", "etcd-test-node", False)


def test_pod_parents_are_pending_so_an_unbound_new_pod_inherits_pending(node, listener, kube):
    """A pod cgroup the agent has not bound yet is judged through the kernel's ancestor walk:
    kubelet's QoS slice carries the pending action, never the node default."""
    p = listener.ports
    node.write_policy("k", doc("summarizer", "    kubernetes:\n      namespace: payments",
                               allow(p["ok"])))
    w = node.workload("kubepods.slice/kubepods-burstable.slice")
    node.start_agent()
    assert w.verdict("connect", host="127.0.0.2", port=p["ok"]) == "EPERM"
    e = node.wait_event(verdict="deny", reason="pending_identity")
    assert e["workload"]["cgroup_path"] == "/kubepods.slice/kubepods-burstable.slice"


# Layouts as kubelet (systemd and cgroupfs drivers), containerd, CRI-O, cri-dockerd, Docker,
# podman and systemd create them: (relative path, expected identity fields). Pod uids with
# underscores under the systemd driver, dashes under cgroupfs.
UID_G, UID_BE, UID_CF, UID_CRIO = (
    "0b2f4a6c-1d3e-4f50-8a9b-0c1d2e3f4a5b", "1c3e5a7b-2d4f-4a61-9b0c-1d2e3f4a5b6c",
    "2d4f6b8c-3e5a-4b72-8c1d-2e3f4a5b6c7d", "3e5a7c9d-4f6b-4c83-9d2e-3f4a5b6c7d8e")
CID = {k: f"{i:x}" * 64 for i, k in enumerate(("g", "be", "cf", "crio", "dockerd"), start=10)}
LAYOUTS = [
    (f"kubepods.slice/kubepods-pod{UID_G.replace('-', '_')}.slice/cri-containerd-{CID['g']}.scope",
     {"kind": "container", "pod_uid": UID_G, "container_id": CID["g"], "runtime": "containerd",
      "namespace": "team-g", "pod": "guaranteed-0", "container": "app"}),
    (f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_BE.replace('-', '_')}"
     f".slice/docker-{CID['dockerd']}.scope",
     {"kind": "container", "pod_uid": UID_BE, "container_id": CID["dockerd"], "runtime": "docker",
      "namespace": "team-be", "pod": "besteffort-0"}),
    (f"kubepods/burstable/pod{UID_CF}/{CID['cf']}",
     {"kind": "container", "pod_uid": UID_CF, "container_id": CID["cf"], "namespace": "team-cf",
      "pod": "cgroupfs-0", "container": "app"}),
    (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_CRIO.replace('-', '_')}"
     f".slice/crio-{CID['crio']}.scope",
     {"kind": "container", "pod_uid": UID_CRIO, "container_id": CID["crio"], "runtime": "cri-o",
      "namespace": "team-crio", "pod": "crio-0", "container": "app"}),
    (f"docker/{CID['g']}", {"kind": "container", "container_id": CID["g"], "runtime": "docker",
                            "pod_uid": None, "namespace": None}),
    (f"machine.slice/libpod-{CID['be']}.scope", {"kind": "container", "container_id": CID["be"],
                                                  "runtime": "podman"}),
    ("system.slice/nginx.service", {"kind": "service", "unit": "nginx.service"}),
    ("system.slice/getty@tty1.service", {"kind": "service", "unit": "getty@tty1.service"}),
    ("user.slice/user-1000.slice/session-3.scope", {"kind": "scope", "unit": "session-3.scope"}),
    ("user.slice/user-1000.slice/user@1000.service/app.slice/editor.service",
     {"kind": "service", "unit": "editor.service"}),
    ("system.slice/nginx.service/worker-pool", {"kind": "service", "unit": "nginx.service"}),
    ("batch/job-17", {"kind": "cgroup", "unit": None, "pod_uid": None, "container_id": None}),
]
PODS = {UID_G: ("team-g", "guaranteed-0", f"containerd://{CID['g']}"),
        UID_BE: ("team-be", "besteffort-0", f"docker://{CID['dockerd']}"),
        UID_CF: ("team-cf", "cgroupfs-0", f"containerd://{CID['cf']}"),
        UID_CRIO: ("team-crio", "crio-0", f"cri-o://{CID['crio']}")}


def test_every_layout_is_identified_in_events(node, listener, kube):
    for uid, (ns, name, cid) in PODS.items():
        kube.add_pod(ns, name, node=NODE, uid=uid, containers=[("app", cid)])
    node.write_config(defaultAction="deny", kubernetes=kube.node_config)  # deny: an event each
    workloads = [(node.workload(path), path, want) for path, want in LAYOUTS]
    node.start_agent()
    for w, path, want in workloads:
        assert w.verdict("connect", host="127.0.0.2", port=listener.ports["ok"]) == "EPERM", path
        wl = node.wait_event(verdict="deny", workload__pid=w.pid)["workload"]
        assert wl["cgroup_path"] == "/" + path
        got = {k: wl[k] for k in want}
        assert got == want, path
