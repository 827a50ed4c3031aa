"""PodWatcher against a fake API server that speaks the real list/watch protocol.

Nothing is mocked: the official client makes real HTTP requests to tests/kubeapi.py on
127.0.0.1, so selectors, resourceVersions, bookmarks, 410s and dropped streams are checked at
the wire (the server's request log), not at a stub's call list.
"""

from __future__ import annotations

import threading
import time

import pytest

from hostagent.errors import ConfigError
from hostagent.identity.kube import (
    NamespaceInfo,
    PodInfo,
    PodWatcher,
    make_api_client,
    parse_pod,
    split_container_id,
)
from tests.kubeapi import FakeKubeAPI, make_pod, wait_for

NODE = "node-a"
TOKEN = "t0ken"
CID1 = "containerd://" + "1" * 64
CID2 = "cri-o://" + "2" * 64
CID3 = "docker://" + "3" * 64
FAST = {"resync_backoff": (0.05, 0.2), "watch_timeout_seconds": 1}


class Changes:
    """on_change recorder: every call's uids, thread-safe."""

    def __init__(self) -> None:
        self.calls: list[set[str]] = []
        self.lock = threading.Lock()

    def __call__(self, uids: set[str]) -> None:
        with self.lock:
            self.calls.append(set(uids))

    def seen(self) -> set[str]:
        with self.lock:
            return set().union(*self.calls) if self.calls else set()

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()


@pytest.fixture
def api():
    with FakeKubeAPI(token=TOKEN) as server:
        server.add_namespace("default")
        yield server


@pytest.fixture
def client(api, tmp_path):
    c = make_api_client(api.kubeconfig(tmp_path / "kubeconfig", token=TOKEN))
    yield c
    c.close()


@pytest.fixture
def start():
    """start(client, **kw) -> a started PodWatcher; all are stopped at teardown."""
    started: list[PodWatcher] = []

    def _start(client, node=NODE, on_change=None, **kw):
        w = PodWatcher(client, node, on_change, **{**FAST, **kw})
        w.start()
        started.append(w)
        return w

    yield _start
    for w in started:
        w.stop(timeout=2.0)


def synced(w: PodWatcher) -> PodWatcher:
    assert w.wait_synced(5.0), (w.state, w.last_error)
    assert w.state == "synced"
    return w


def pod_lists(api: FakeKubeAPI) -> int:
    return len(api.requests_for("pods", watch=False))


# ------------------------------------------------------------------------------------------
# parsing (pure)


def test_split_container_id():
    assert split_container_id(CID1) == ("containerd", "1" * 64)
    assert split_container_id(CID2) == ("cri-o", "2" * 64)
    assert split_container_id("abc") == ("", "abc")


def test_parse_pod_reads_identity_and_every_kind_of_container():
    obj = make_pod("shop", "web-0", node=NODE, uid="u-1", service_account="web",
                   labels={"tier": "front", "app": "web"},
                   containers=[("app", CID1), ("sidecar", ""), ("log", CID3)],
                   init_containers=[("init", CID2)],
                   ephemeral_containers=[("debug", "containerd://" + "4" * 64)])
    obj["metadata"]["resourceVersion"] = "42"
    p = parse_pod(obj)
    assert (p.uid, p.namespace, p.name, p.service_account, p.node, p.phase,
            p.resource_version) == ("u-1", "shop", "web-0", "web", NODE, "Running", "42")
    assert p.labels == (("app", "web"), ("tier", "front"))
    assert p.label_dict() == {"app": "web", "tier": "front"}
    # a container not created yet (no containerID) has no entry until it gets one
    assert p.containers == tuple(sorted([("1" * 64, "app"), ("3" * 64, "log"),
                                         ("2" * 64, "init"), ("4" * 64, "debug")]))
    assert p.container_name("1" * 64) == "app"
    assert p.container_name(CID2) == "init"       # the API's spelling works too
    assert p.container_name("f" * 64) is None
    assert p.container_runtime("2" * 64) == "cri-o"
    assert p.container_runtime("3" * 64) == "docker"
    with pytest.raises(ValueError):
        parse_pod({"metadata": {"name": "x"}})


def test_constructor_rejects_bad_arguments(client):
    with pytest.raises(ValueError):
        PodWatcher(client, "")
    with pytest.raises(ValueError):
        PodWatcher(client, NODE, resync_backoff=(2.0, 1.0))
    with pytest.raises(ValueError):
        PodWatcher(client, NODE, watch_timeout_seconds=0)


# ------------------------------------------------------------------------------------------
# credentials


def test_make_api_client_without_any_config_says_what_is_missing():
    with pytest.raises(ConfigError) as err:
        make_api_client(None, environ={})
    assert "KUBERNETES_SERVICE_HOST" in str(err.value)
    assert "kubeconfig" in str(err.value)


def test_make_api_client_missing_kubeconfig_names_the_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as err:
        make_api_client(str(missing), environ={})
    assert str(missing) in str(err.value)


def test_make_api_client_rejects_unusable_kubeconfig(tmp_path):
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with pytest.raises(ConfigError) as err:
        make_api_client(str(bad), environ={})
    assert str(bad) in str(err.value)


def test_make_api_client_in_cluster(tmp_path):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    c = make_api_client(None, serviceaccount_dir=str(tmp_path), environ=env)
    try:
        assert c.configuration.host == "https://10.96.0.1:443"
        assert c.configuration.ssl_ca_cert == str(tmp_path / "ca.crt")
        assert c.configuration.auth_settings()["BearerToken"]["value"] == "bearer sa-token"
    finally:
        c.close()
    (tmp_path / "token").unlink()
    with pytest.raises(ConfigError) as err:
        make_api_client(None, serviceaccount_dir=str(tmp_path), environ=env)
    assert "service account" in str(err.value)


def test_unauthenticated_is_a_clear_error(api, tmp_path, start):
    c = make_api_client(api.kubeconfig(tmp_path / "kc"))   # no token
    try:
        w = start(c)
        assert not w.wait_synced(0.5)
        wait_for(lambda: w.state == "error", 3, "error state")
        assert "401" in w.last_error and "credentials" in w.last_error
        assert all(r.authorization is None for r in api.requests)
    finally:
        c.close()


# ------------------------------------------------------------------------------------------
# list/watch


def test_initial_sync_lists_only_this_node(api, client, start):
    mine = api.add_pod("default", "web", node=NODE, labels={"app": "web"},
                       containers=[("app", CID1)])
    api.add_pod("default", "elsewhere", node="node-b")
    changes = Changes()
    w = synced(start(client, on_change=changes))
    assert set(w.pods()) == {mine}
    assert w.pod(mine).containers == (("1" * 64, "app"),)
    assert changes.seen() == {mine}
    first = api.requests_for("pods")[0]
    assert first.query["fieldSelector"] == f"spec.nodeName={NODE}"
    assert not first.watch
    assert all(r.authorization == f"Bearer {TOKEN}" for r in api.requests)
    ns = w.namespace("default")
    assert isinstance(ns, NamespaceInfo)
    assert ns.label_dict() == {"kubernetes.io/metadata.name": "default"}
    watch = wait_for(lambda: api.requests_for("pods", watch=True), 3, "pod watch")[0]
    assert watch.query["fieldSelector"] == f"spec.nodeName={NODE}"
    assert watch.query["allowWatchBookmarks"] == "true"
    assert watch.query["timeoutSeconds"] == "1"
    assert watch.query["resourceVersion"] == str(api.resource_version)


def test_add_modify_delete_are_applied_and_reported(api, client, start):
    changes = Changes()
    w = synced(start(client, on_change=changes))
    changes.clear()

    uid = api.add_pod("default", "web", node=NODE, labels={"app": "web"},
                      containers=[("app", CID1)])
    wait_for(lambda: w.pod(uid), 3, "added pod")
    wait_for(lambda: uid in changes.seen(), 3, "on_change for add")

    changes.clear()
    api.update_pod(uid, labels={"app": "web", "v": "2"}, containers=[("app", CID1),
                                                                      ("side", CID2)])
    wait_for(lambda: w.pod(uid).label_dict().get("v") == "2", 3, "modified labels")
    p = w.pod(uid)
    assert p.container_name("2" * 64) == "side" and p.container_runtime(CID2) == "cri-o"
    wait_for(lambda: changes.seen() == {uid}, 3, "on_change for modify")

    # status churn that leaves the identity alone is applied (new RV) but not reported
    changes.clear()
    rv = api.update_pod(uid, annotations={"probe": "ok"})
    wait_for(lambda: w.pod(uid).resource_version == str(rv), 3, "churn applied")
    other = api.add_pod("default", "elsewhere", node="node-b")
    unbound = api.add_pod("default", "pending", node="")
    api.update_pod(unbound, node=NODE)   # scheduled here: ADDED for our selector
    wait_for(lambda: w.pod(unbound), 3, "pod bound to this node")
    assert changes.seen() == {unbound}
    assert w.pod(other) is None

    changes.clear()
    api.delete_pod(uid)
    wait_for(lambda: w.pod(uid) is None, 3, "deleted pod")
    wait_for(lambda: changes.seen() == {uid}, 3, "on_change for delete")
    assert w.stats["events_applied"] >= 4
    assert pod_lists(api) == 1


def test_bookmark_moves_the_resume_point(api, client, start):
    w = synced(start(client))
    wait_for(lambda: api.open_watches("pods"), 3, "open pod watch")
    for i in range(3):                 # events our selector filters out
        api.add_pod("default", f"far-{i}", node="node-b")
    target = str(api.resource_version)
    assert w.resource_versions()["pods"] != target
    api.send_bookmarks()
    wait_for(lambda: w.resource_versions()["pods"] == target, 3, "bookmark applied")
    assert w.stats["bookmarks"] >= 1
    # the watch times out after 1 s; the next one resumes from the bookmark, without a list
    wait_for(lambda: any(r.query.get("resourceVersion") == target
                         for r in api.requests_for("pods", watch=True)), 4, "resumed watch")
    assert pod_lists(api) == 1


@pytest.mark.parametrize("gone_mode", ["event", "http"])
def test_410_gone_relists_and_drops_pods_deleted_meanwhile(api, client, start, gone_mode):
    api.gone_mode = gone_mode
    keep = api.add_pod("default", "keep", node=NODE)
    gone = api.add_pod("default", "gone", node=NODE)
    changes = Changes()
    w = synced(start(client, on_change=changes, watch_timeout_seconds=300))
    wait_for(lambda: api.open_watches("pods"), 3, "open pod watch")
    changes.clear()
    stale = w.resource_versions()["pods"]
    with api.freeze():                # the watch misses these ...
        api.delete_pod(gone)
        new = api.add_pod("default", "new", node=NODE)
        api.compact()                 # ... and they are compacted away
        api.drop_watches()
        # both watches resume from before the compaction: pods and namespaces relist
        wait_for(lambda: w.stats["relists_410"] == 2, 5, "relists after 410")
        wait_for(lambda: w.pod(new) is not None, 3, "relisted state")
    assert set(w.pods()) == {keep, new}
    assert changes.seen() == {gone, new}
    assert pod_lists(api) == 2
    assert any(r.query.get("resourceVersion") == stale
               for r in api.requests_for("pods", watch=True))
    assert w.state == "synced"


def test_dropped_stream_resumes_without_relist(api, client, start):
    w = synced(start(client, watch_timeout_seconds=300))
    wait_for(lambda: api.open_watches("pods") and api.open_watches("namespaces"), 3,
             "open watches")
    before = len(api.requests_for("pods", watch=True))
    last = w.resource_versions()["pods"]
    api.drop_watches()
    wait_for(lambda: len(api.requests_for("pods", watch=True)) > before, 3, "re-watch")
    assert api.requests_for("pods", watch=True)[-1].query["resourceVersion"] == last
    uid = api.add_pod("default", "after-drop", node=NODE)
    wait_for(lambda: w.pod(uid), 3, "event on the resumed watch")
    assert pod_lists(api) == 1
    assert w.stats["watch_restarts"] >= 1 and w.stats["errors"] == 0
    assert w.state == "synced"


def test_server_down_is_an_error_until_it_comes_back(api, client, start):
    w = synced(start(client, watch_timeout_seconds=300))
    api.down()
    wait_for(lambda: w.state == "error", 5, "error state")
    assert "pods" in w.last_error or "namespaces" in w.last_error
    assert "reach" in w.last_error
    uid = api.add_pod("default", "while-down", node=NODE)
    api.up()
    wait_for(lambda: w.state == "synced", 5, "synced again")
    wait_for(lambda: w.pod(uid), 3, "pod created while down")
    # whichever watch failed to reconnect relisted (the other may have resumed in time)
    assert w.stats["lists"] >= 3
    assert w.stats["errors"] >= 1


def test_namespace_label_change_reports_its_pods(api, client, start):
    api.add_namespace("shop", {"team": "a"})
    api.add_namespace("other")
    in_shop = {api.add_pod("shop", f"p{i}", node=NODE) for i in range(2)}
    api.add_pod("other", "o", node=NODE)
    api.add_pod("shop", "far", node="node-b")
    changes = Changes()
    w = synced(start(client, on_change=changes))
    assert w.namespace("shop").label_dict()["team"] == "a"
    changes.clear()
    api.update_namespace_labels("shop", {"team": "b"})
    wait_for(lambda: w.namespace("shop").label_dict()["team"] == "b", 3, "ns labels")
    wait_for(lambda: changes.seen() == in_shop, 3, "pods of the namespace reported")


def test_without_namespaces(api, client, start):
    uid = api.add_pod("default", "web", node=NODE)
    w = synced(start(client, watch_namespaces=False))
    assert w.pod(uid) and w.namespace("default") is None
    assert api.requests_for("namespaces") == []


def test_raising_callback_does_not_kill_the_watcher(api, client, start):
    def boom(uids):
        raise RuntimeError("consumer bug")

    w = synced(start(client, on_change=boom))
    uid = api.add_pod("default", "web", node=NODE)
    wait_for(lambda: w.pod(uid), 3, "first pod")
    uid2 = api.add_pod("default", "web2", node=NODE)
    wait_for(lambda: w.pod(uid2), 3, "second pod after a failing callback")
    assert w.stats["callback_errors"] >= 2
    assert w.state == "synced"


def test_stop_is_prompt_while_a_watch_is_blocked(api, client):
    w = PodWatcher(client, NODE, watch_timeout_seconds=300)
    w.start()
    synced(w)
    wait_for(lambda: api.open_watches("pods") and api.open_watches("namespaces"), 3,
             "blocked watches")
    t0 = time.monotonic()
    w.stop(timeout=5.0)
    assert time.monotonic() - t0 < 2.0
    assert not any(t.name.startswith("kube-watch-") for t in threading.enumerate())
    wait_for(lambda: not api.open_watches("pods"), 3, "server saw the stream close")


def test_podinfo_is_a_value():
    p = parse_pod(make_pod("ns", "n", node=NODE, uid="u"))
    assert isinstance(p, PodInfo)
    with pytest.raises(AttributeError):
        p.name = "other"   # type: ignore[misc]
    assert hash(p) == hash(parse_pod(make_pod("ns", "n", node=NODE, uid="u")))
