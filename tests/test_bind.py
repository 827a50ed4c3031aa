"""Binder: which policy governs each cgroup, for the selector kinds and their precedence.
Pure user space: real policies loaded from YAML, real cgroup path identities, no kernel."""

from __future__ import annotations

from hostagent.bpf.abi import BindingMode
from hostagent.identity.resolver import IdentityResolver
from hostagent.policy.bind import Binder
from hostagent.policy.load import load_policy_dir

UID = "3f1c5a2e-8d4b-4c7a-9e21-0b6d7f5a9c11"
POD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"


def policies(tmp_path, **selectors):
    for name, selector in selectors.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"apiVersion: hostagent.io/v1\nkind: EgressPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  selector:\n    {selector}\n  egress: []\n")
    return load_policy_dir(str(tmp_path))


def bind(tmp_path, paths, **selectors):
    resolver = IdentityResolver(node_name="n", trust_domain="cluster.local",
                                unit_template="spiffe://{trustDomain}/node/{node}/unit/{unit}",
                                container_template="spiffe://{trustDomain}/c/{containerId}")
    binder = Binder(policies(tmp_path, **selectors), [], identify=resolver.identify)
    cgroups = {p: i for i, p in enumerate(paths, start=100)}
    specs = binder.bind(cgroups)
    return {p: specs[cgroups[p]] for p in paths}, binder


def test_user_manager_units_do_not_take_system_unit_policies(tmp_path):
    user_sshd = "/user.slice/user-1000.slice/user@1000.service/app.slice/sshd.service"
    got, _ = bind(tmp_path, ["/", "/system.slice", "/system.slice/sshd.service", "/user.slice",
                             "/user.slice/user-1000.slice",
                             "/user.slice/user-1000.slice/user@1000.service",
                             "/user.slice/user-1000.slice/user@1000.service/app.slice",
                             user_sshd],
                  sshd='systemdUnit: "sshd.service"')
    assert got["/system.slice/sshd.service"].policy == "sshd"
    assert got[user_sshd].policy is None


def test_exact_unit_name_beats_a_glob_without_conflict(tmp_path):
    got, binder = bind(tmp_path, ["/", "/system.slice", "/system.slice/agent.service",
                                  "/system.slice/agent-2.service"],
                       exact='systemdUnit: "agent.service"', glob='systemdUnit: "agent*.service"')
    assert got["/system.slice/agent.service"].policy == "exact"
    assert got["/system.slice/agent-2.service"].policy == "glob"
    assert binder.conflicts == {}


def test_pod_selectors_match_nothing_without_pod_metadata(tmp_path):
    got, _ = bind(tmp_path, ["/", "/kubepods.slice", "/kubepods.slice/kubepods-burstable.slice",
                             POD], every="kubernetes: {podSelector: {}}")
    assert got[POD].policy is None and not got[POD].pending


def test_kubepods_names_inside_a_unit_are_not_pod_parents(tmp_path):
    inside = "/system.slice/x.service/kubepods.slice"
    got, _ = bind(tmp_path, ["/", "/system.slice", "/system.slice/x.service", inside,
                             "/kubepods.slice"], pods="kubernetes: {namespace: a}")
    assert not got[inside].pending
    # the real pod parent is pending (with an identity source configured)
    assert got["/kubepods.slice"].pending and got["/kubepods.slice"].mode is BindingMode.ENFORCE
