"""Pods of this node, from the Kubernetes API: who runs in which container.

Enforcement sees cgroups and container ids; policy speaks of namespaces, service accounts and
labels. This module keeps the map between the two for the pods of *this* node only, the way
client-go's reflector does: list once (with fieldSelector=spec.nodeName=<node>, so a node never
downloads the cluster), then watch from the list's resourceVersion. A watch that ends is resumed
from the last resourceVersion seen (objects or BOOKMARKs), so the API server does not pay for a
relist every few minutes; only "410 Gone" (the history we would resume from was compacted) and
request failures lead to a relist, which replaces the cache atomically so pods deleted while we
were not looking disappear too.

Namespaces are watched the same way (no selector: there are few) because namespaceSelector
policies need their labels.

The official client (kubernetes.client / kubernetes.watch) does the HTTP, credentials and line
splitting. Objects are kept as the raw JSON dicts the server sent rather than the client's
generated models: one parser then serves lists and watch events, and a field the models do not
know yet can never make deserialisation fail.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import urllib3
import yaml
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes import watch as kwatch
from kubernetes.client.rest import ApiException
from kubernetes.config.incluster_config import SERVICE_HOST_ENV_NAME, InClusterConfigLoader

from hostagent.errors import ConfigError
from hostagent.identity import credentials

log = logging.getLogger("hostagent.identity.kube")

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Connect timeout for every request: the API server is one hop away (a Service VIP); a connect
# that takes longer is a dead endpoint, and the backoff loop will try again.
CONNECT_TIMEOUT = 5.0
# Read timeout of a list. A node's pods are at most a few hundred objects; a minute covers a
# loaded API server while keeping a silently dead connection from blocking the loop forever.
LIST_READ_TIMEOUT = 60.0
# A watch is closed by the server after timeoutSeconds; if nothing at all (not even the end of
# the stream) arrives this long after that, the connection is dead (NAT/LB dropped it without
# a RST) and we resume on a new one.
WATCH_READ_GRACE = 30.0

STATE_CONNECTING = "connecting"
STATE_SYNCED = "synced"
STATE_ERROR = "error"

_HTTP_GONE = 410


# ------------------------------------------------------------------------------------------
# What we keep


@dataclass(frozen=True, slots=True)
class PodInfo:
    """The identity of one pod of this node, as policy and events need it."""

    uid: str
    namespace: str
    name: str
    service_account: str
    node: str
    labels: tuple[tuple[str, str], ...]        # sorted by key
    containers: tuple[tuple[str, str], ...]    # (container_id, container name), sorted; no scheme
    phase: str
    resource_version: str
    # (container_id, runtime) for the same ids, sorted; the runtime is the containerID scheme
    # ("containerd", "cri-o", "docker") that tells how the id appears in cgroup paths.
    runtimes: tuple[tuple[str, str], ...] = ()
    # Static pods: kubelet names their cgroup after the manifest hash, not the API uid; the
    # mirror pod carries that hash in kubernetes.io/config.hash.
    config_hash: str | None = None

    def keys(self) -> set[str]:
        """Every id a cgroup path may name this pod by."""
        return {self.uid, self.config_hash} if self.config_hash else {self.uid}

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def container_name(self, container_id: str) -> str | None:
        """Name of a container of this pod, by id (bare, or "runtime://id" as the API shows it)."""
        cid = split_container_id(container_id)[1]
        for known, name in self.containers:
            if known == cid:
                return name
        return None

    def container_runtime(self, container_id: str) -> str | None:
        cid = split_container_id(container_id)[1]
        for known, runtime in self.runtimes:
            if known == cid:
                return runtime
        return None


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    labels: tuple[tuple[str, str], ...]        # sorted by key

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def split_container_id(value: str) -> tuple[str, str]:
    """("containerd", "<id>") from "containerd://<id>"; ("", "<id>") for a bare id."""
    runtime, sep, cid = value.partition("://")
    return (runtime, cid) if sep else ("", value)


def _labels(meta: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    labels = meta.get("labels") or {}
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def parse_pod(obj: Mapping[str, Any]) -> PodInfo:
    """PodInfo from a Pod as the API serves it (camelCase JSON). ValueError if it has no uid.

    Container ids come from the status lists (regular, init and ephemeral containers): the spec
    has names only, and a container that has not been created yet has no id, so it is left out
    until the status update that gives it one.
    """
    meta = obj.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        raise ValueError(f"pod without metadata.uid: {meta.get('namespace')}/{meta.get('name')}")
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    containers: dict[str, str] = {}
    runtimes: dict[str, str] = {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            raw = cs.get("containerID") or ""
            runtime, cid = split_container_id(raw)
            if cid:
                containers[cid] = str(cs.get("name") or "")
                runtimes[cid] = runtime
    return PodInfo(
        uid=str(uid),
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        # serviceAccount is the deprecated spelling, still filled in by old API servers
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount")
                            or "default"),
        node=str(spec.get("nodeName") or ""),
        labels=_labels(meta),
        containers=tuple(sorted(containers.items())),
        phase=str(status.get("phase") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        runtimes=tuple(sorted(runtimes.items())),
        config_hash=_mirror_hash(meta),
    )


def _mirror_hash(meta: Mapping[str, Any]) -> str | None:
    annotations = meta.get("annotations") or {}
    if "kubernetes.io/config.mirror" not in annotations:
        return None   # only kubelet's mirror pods stand for a static pod
    value = str(annotations.get("kubernetes.io/config.hash") or "").lower()
    return value if re.fullmatch(r"[0-9a-f]{32}", value) else None


def parse_namespace(obj: Mapping[str, Any]) -> NamespaceInfo:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ValueError("namespace without metadata.name")
    return NamespaceInfo(name=str(name), labels=_labels(meta))


def _same_identity(a: PodInfo | None, b: PodInfo | None) -> bool:
    """Equal except for resourceVersion: status churn (probes, conditions) is not a change."""
    if a is None or b is None:
        return a is b
    return replace(a, resource_version="") == replace(b, resource_version="")


# ------------------------------------------------------------------------------------------
# Credentials


def make_api_client(kubeconfig: str | None, *,
                    serviceaccount_dir: str = SERVICEACCOUNT_DIR,
                    environ: Mapping[str, str] | None = None) -> kclient.ApiClient:
    """An ApiClient with this node's credentials.

    A given kubeconfig always wins (an operator who names one means it). Without one, the
    pod's service account is used when we run in a pod (KUBERNETES_SERVICE_HOST set and a
    token mounted); the token is re-read as the kubelet rotates it. There is deliberately no
    fallback to ~/.kube/config: a DaemonSet that silently picked up some user's credentials
    would be worse than one that refuses to start. serviceaccount_dir and environ exist for
    tests.
    """
    env = os.environ if environ is None else environ
    if kubeconfig is not None:
        if not os.path.isfile(kubeconfig):
            raise ConfigError("kubeconfig file does not exist", path=kubeconfig)
        cfg = kclient.Configuration()
        try:
            # persist_config=False: never write refreshed tokens back into the operator's file
            kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                     persist_config=False)
        except (kconfig.ConfigException, OSError, ValueError, KeyError, TypeError,
                yaml.YAMLError) as err:
            raise ConfigError(f"cannot use kubeconfig: {err}", path=kubeconfig) from err
        return kclient.ApiClient(configuration=cfg)
    if env.get(SERVICE_HOST_ENV_NAME):
        cfg = kclient.Configuration()
        loader = InClusterConfigLoader(
            token_filename=os.path.join(serviceaccount_dir, "token"),
            cert_filename=os.path.join(serviceaccount_dir, "ca.crt"),
            environ=env)
        try:
            loader.load_and_set(cfg)
        except (kconfig.ConfigException, OSError) as err:
            raise ConfigError(
                f"running in a pod ({SERVICE_HOST_ENV_NAME} is set) but the service account "
                f"credentials in {serviceaccount_dir} are unusable: {err}") from err
        return kclient.ApiClient(configuration=cfg)
    raise ConfigError(credentials.NO_CREDENTIALS)


# ------------------------------------------------------------------------------------------
# list/watch


class _Expired(Exception):
    """The resourceVersion we would resume from is gone (410): relist."""


class _StreamBroken(Exception):
    """An open watch stream broke (server restart, LB idle cut): resume, no relist needed."""

    def __init__(self, message: str, received: bool) -> None:
        super().__init__(message)
        self.received = received   # whether the stream delivered anything before breaking


class _RawWatch(kwatch.Watch):
    """kubernetes.watch.Watch that hands events over as the raw JSON dicts.

    With no return type, Watch skips model deserialisation and leaves 'object' the dict the
    server sent; it still splits the stream into lines and turns ERROR events into
    ApiException. (Its own deserialize=False switch is not usable: ERROR events then fail
    with KeyError 'raw_object' in kubernetes 37.)
    """

    def get_return_type(self, func: Callable[..., Any]) -> None:
        return None


class _Backoff:
    """Bounded, jittered exponential delays: first, 2*first, ... up to cap, each * [0.5, 1)."""

    def __init__(self, first: float, cap: float, rng: random.Random) -> None:
        self.first, self.cap, self.rng = first, cap, rng
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def _describe(err: BaseException) -> str:
    """One line an operator can act on, instead of ApiException's header dump."""
    if isinstance(err, ApiException):
        text = f"HTTP {err.status} {err.reason}".rstrip()
        if err.status == 401:
            text += " (the API server rejected the credentials: check the token/kubeconfig)"
        elif err.status == 403:
            text += " (the service account lacks RBAC permission to list/watch)"
        return text
    if isinstance(err, urllib3.exceptions.MaxRetryError):
        return f"cannot reach the API server: {err.reason}"
    return f"{type(err).__name__}: {err}"


@dataclass(slots=True)
class _Reflector:
    """List-then-watch loop for one resource, run in its own daemon thread."""

    resource: str                                   # "pods" | "namespaces", for logs/errors
    call: Callable[..., Any]                        # CoreV1Api list function
    selector: dict[str, str]                        # extra list/watch arguments
    replace_all: Callable[[list[dict[str, Any]]], set[str]]
    apply_event: Callable[[str, dict[str, Any]], set[str]]
    rv: str | None = None                           # None: the next step is a (re)list
    state: str = STATE_CONNECTING
    synced: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    resp: Any = None                                # open watch response, for stop()
    resp_lock: threading.Lock = field(default_factory=threading.Lock)

    def interrupt(self) -> None:
        """Unblock a watch read from another thread.

        Closing a socket does not wake a thread blocked in recv() on it; shutdown() does (the
        read sees EOF), and the watch loop, seeing the stop flag, exits.
        """
        with self.resp_lock:
            resp = self.resp
        _shutdown_response(resp)


def _shutdown_response(resp: Any) -> None:
    conn = getattr(resp, "connection", None) if resp is not None else None
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other side: the reader is waking up anyway


class PodWatcher:
    """The pods of one node (and all namespaces), kept current from the API server.

    Lookups (pod, pods, namespace) may come from any thread at any time; the caches are
    replaced or updated under one lock and handed out as immutable values or copies.
    on_change(uids) is called from a watcher thread, never under that lock, with the uids of
    pods that were added, changed (identity fields, not mere status churn) or removed, and of
    all pods of a namespace whose labels changed. Calls are serialised, so the callback need
    not be thread-safe against itself; one that raises is logged and counted.
    """

    def __init__(self, api_client: kclient.ApiClient, node_name: str,
                 on_change: Callable[[set[str]], None] | None = None, *,
                 resync_backoff: tuple[float, float] = (0.2, 10.0),
                 watch_timeout_seconds: int = 300,
                 watch_namespaces: bool = True) -> None:
        if not node_name:
            raise ValueError(repr(node_name))
        first, cap = resync_backoff
        if not 0 < first <= cap:
            raise ValueError(repr(resync_backoff))
        if int(watch_timeout_seconds) < 1:
            raise ValueError(repr(watch_timeout_seconds))
        self._node = node_name
        self._on_change = on_change
        self._backoff = (float(first), float(cap))
        self._watch_timeout = int(watch_timeout_seconds)
        self._rng = random.Random()

        self._lock = threading.Lock()           # caches, stats, last error
        self._notify_lock = threading.Lock()    # serialises on_change
        self._stopping = threading.Event()
        self._pods: dict[str, PodInfo] = {}
        self._namespaces: dict[str, NamespaceInfo] = {}
        self._last_error: str | None = None
        self._stats = {"lists": 0, "relists_410": 0, "watch_restarts": 0, "events_applied": 0,
                       "bookmarks": 0, "errors": 0, "callback_errors": 0}

        core = kclient.CoreV1Api(api_client)
        self._reflectors = [_Reflector(
            "pods", core.list_pod_for_all_namespaces,
            {"field_selector": f"spec.nodeName={node_name}"},
            self._replace_pods, self._apply_pod)]
        if watch_namespaces:
            self._reflectors.append(_Reflector(
                "namespaces", core.list_namespace, {},
                self._replace_namespaces, self._apply_namespace))
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher threads; returns at once (see wait_synced)."""
        if self._started:
            raise RuntimeError("PodWatcher already started")
        self._started = True
        for r in self._reflectors:
            r.thread = threading.Thread(target=self._run, args=(r,), daemon=True,
                                        name=f"kube-watch-{r.resource}")
            r.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads, closing open watch streams so no read keeps them; bounded."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for r in self._reflectors:
            r.interrupt()
        for r in self._reflectors:
            if r.thread is None:
                continue
            r.thread.join(max(0.0, deadline - time.monotonic()))
            if r.thread.is_alive():
                # a list blocked before the response arrived; bounded by LIST_READ_TIMEOUT
                # and the thread is a daemon, so it cannot hold the process up
                log.warning("kube watcher for %s did not stop within %.1fs", r.resource, timeout)

    def wait_synced(self, timeout: float) -> bool:
        """True once the first full list of pods (and namespaces) has been applied."""
        deadline = time.monotonic() + timeout
        for r in self._reflectors:
            if not r.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- lookups ------------------------------------------------------------------------

    def pod(self, uid: str) -> PodInfo | None:
        """A pod by its uid, or a static pod by its manifest hash (what its cgroup is named by)."""
        with self._lock:
            info = self._pods.get(uid)
            if info is None and len(uid) == 32:
                info = next((p for p in self._pods.values() if p.config_hash == uid), None)
            return info

    def pods(self) -> dict[str, PodInfo]:
        with self._lock:
            return dict(self._pods)

    def namespace(self, name: str) -> NamespaceInfo | None:
        with self._lock:
            return self._namespaces.get(name)

    @property
    def node_name(self) -> str:
        return self._node

    @property
    def state(self) -> str:
        """"connecting" until the first sync, "synced", or "error" while requests fail."""
        states = [r.state for r in self._reflectors]
        if STATE_ERROR in states:
            return STATE_ERROR
        if all(s == STATE_SYNCED for s in states):
            return STATE_SYNCED
        return STATE_CONNECTING

    @property
    def last_error(self) -> str | None:
        """The most recent error; kept after recovery so status can show what happened."""
        with self._lock:
            return self._last_error

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def resource_versions(self) -> dict[str, str | None]:
        """Where each watch would resume (for status and tests)."""
        return {r.resource: r.rv for r in self._reflectors}

    # -- cache updates (all under self._lock, return the pod uids to report) -------------

    def _uids_in(self, namespaces: Iterable[str]) -> set[str]:
        names = set(namespaces)
        return {k for p in self._pods.values() if p.namespace in names for k in p.keys()}

    def _replace_pods(self, items: list[dict[str, Any]]) -> set[str]:
        fresh: dict[str, PodInfo] = {}
        for obj in items:
            info = self._parse(parse_pod, obj)
            if info is not None and info.node == self._node:
                fresh[info.uid] = info
        with self._lock:
            old, self._pods = self._pods, fresh
        changed = set()
        for uid in old.keys() | fresh.keys():
            before, after = old.get(uid), fresh.get(uid)
            if not _same_identity(before, after):
                changed |= (before or after).keys() | (after.keys() if after else set())
        return changed

    def _apply_pod(self, kind: str, obj: dict[str, Any]) -> set[str]:
        info = self._parse(parse_pod, obj)
        if info is None:
            return set()
        with self._lock:
            old = self._pods.get(info.uid)
            # a pod not of this node should never come through the field selector; if a proxy
            # ignored it, keeping such pods would attribute foreign identities to local ids
            if kind == "DELETED" or info.node != self._node:
                self._pods.pop(info.uid, None)
                return old.keys() | info.keys() if old is not None else set()
            self._pods[info.uid] = info
        return set() if _same_identity(old, info) else info.keys() | (old.keys() if old else set())

    def _replace_namespaces(self, items: list[dict[str, Any]]) -> set[str]:
        fresh: dict[str, NamespaceInfo] = {}
        for obj in items:
            info = self._parse(parse_namespace, obj)
            if info is not None:
                fresh[info.name] = info
        with self._lock:
            old, self._namespaces = self._namespaces, fresh
            changed = {n for n in old.keys() | fresh.keys() if old.get(n) != fresh.get(n)}
            return self._uids_in(changed)

    def _apply_namespace(self, kind: str, obj: dict[str, Any]) -> set[str]:
        info = self._parse(parse_namespace, obj)
        if info is None:
            return set()
        with self._lock:
            old = self._namespaces.get(info.name)
            if kind == "DELETED":
                self._namespaces.pop(info.name, None)
                changed = old is not None
            else:
                self._namespaces[info.name] = info
                changed = old != info
            return self._uids_in([info.name]) if changed else set()

    def _parse(self, parser: Callable[[Mapping[str, Any]], Any], obj: Mapping[str, Any]) -> Any:
        try:
            return parser(obj)
        except (ValueError, TypeError, AttributeError) as err:
            log.warning("ignoring malformed object: %s", err)
            return None

    # -- the loop -----------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _notify(self, uids: set[str]) -> None:
        if not uids or self._on_change is None:
            return
        with self._notify_lock:
            try:
                self._on_change(set(uids))
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the watch
                self._count("callback_errors")
                log.exception("on_change callback failed for %d pod(s)", len(uids))

    def _fail(self, r: _Reflector, what: str, err: BaseException) -> None:
        message = f"{what} {r.resource}: {_describe(err)}"
        r.state = STATE_ERROR
        with self._lock:
            self._last_error = message
            self._stats["errors"] += 1
        log.warning("%s", message)

    def _run(self, r: _Reflector) -> None:
        backoff = _Backoff(*self._backoff, self._rng)
        # consecutive watches that failed without delivering anything: the first is routine
        # and retried at once, a repeat is backed off so a misbehaving server is not hammered
        broken_in_a_row = expired_in_a_row = 0
        while not self._stopping.is_set():
            if r.rv is None:
                try:
                    self._list(r)
                except Exception as err:  # noqa: BLE001 - any failure: report, back off, retry
                    if self._stopping.is_set():
                        break
                    self._fail(r, "listing", err)
                    self._stopping.wait(backoff.next())
                    continue
                backoff.reset()
            try:
                if self._watch(r) is not None:
                    # ended normally (timeoutSeconds): resume from r.rv, no relist
                    self._count("watch_restarts")
                    broken_in_a_row = expired_in_a_row = 0
                    backoff.reset()
            except _Expired as err:
                log.info("watch of %s expired (%s): relisting", r.resource, err)
                self._count("relists_410")
                r.rv = None
                expired_in_a_row += 1
                if expired_in_a_row > 1:
                    self._stopping.wait(backoff.next())
            except _StreamBroken as err:
                if self._stopping.is_set():
                    break
                # routine (API server rollout, idle cut): resume from r.rv, no relist; only a
                # stream that keeps breaking at once is backed off
                broken_in_a_row = 1 if err.received else broken_in_a_row + 1
                expired_in_a_row = 0
                self._count("watch_restarts")
                log.info("watch of %s broke (%s): resuming from %s", r.resource, err, r.rv)
                if broken_in_a_row > 1:
                    self._stopping.wait(backoff.next())
            except Exception as err:  # noqa: BLE001 - request failed: back off and relist
                if self._stopping.is_set():
                    break
                self._fail(r, "watching", err)
                r.rv = None
                self._stopping.wait(backoff.next())

    def _list(self, r: _Reflector) -> None:
        resp = r.call(**r.selector, _preload_content=False,
                      _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT))
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        if not isinstance(body, dict):
            raise ValueError(f"{r.resource} list is not an object")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if not rv:
            raise ValueError(f"{r.resource} list has no metadata.resourceVersion")
        items = body.get("items") or []
        changed = r.replace_all(items)
        r.rv = str(rv)
        r.state = STATE_SYNCED
        r.synced.set()
        self._count("lists")
        log.info("listed %d %s at resourceVersion %s", len(items), r.resource, rv)
        self._notify(changed)

    def _watch(self, r: _Reflector) -> bool | None:
        """One watch from r.rv until the server ends it; r.rv follows every event.

        Returns whether any event arrived (None if stopped). Raises _Expired on 410 (whether
        the server answered the request with 410 or, as the API server does, with 200 and an
        ERROR event carrying a 410 Status; Watch turns both into ApiException), _StreamBroken
        when an open stream broke, anything else when the request itself failed.
        """
        opened = False
        received = False

        def call(**kwargs: Any) -> Any:
            nonlocal opened
            resp = r.call(**kwargs)
            opened = True
            with r.resp_lock:
                r.resp = resp
            if self._stopping.is_set():   # stop() may have looked before resp was published
                _shutdown_response(resp)
            return resp

        stream = _RawWatch().stream(
            call, **r.selector, resource_version=r.rv, allow_watch_bookmarks=True,
            # with timeout_seconds set, Watch never retries on its own: 410 reaches us
            timeout_seconds=self._watch_timeout,
            _request_timeout=(CONNECT_TIMEOUT, self._watch_timeout + WATCH_READ_GRACE))
        try:
            for event in stream:
                if self._stopping.is_set():
                    return None
                if isinstance(event, dict):   # Watch yields None for a line that is not JSON
                    received = True
                    self._handle(r, event)
        except ApiException as err:
            if err.status == _HTTP_GONE:
                raise _Expired(_describe(err)) from err
            raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if self._stopping.is_set():
                return None
            if opened:
                raise _StreamBroken(_describe(err), received) from err
            raise
        finally:
            stream.close()   # runs Watch's finally: the response is closed, not leaked
            with r.resp_lock:
                r.resp = None
        return None if self._stopping.is_set() else received

    def _handle(self, r: _Reflector, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object", event.get("object"))
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            # Watch raises on these itself; kept in case a client version yields them instead
            if obj.get("code") == _HTTP_GONE:
                raise _Expired(str(obj.get("message")))
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: "
                                                             f"{obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            changed = r.apply_event(kind, obj)
            self._count("events_applied")
        elif kind == "BOOKMARK":
            # only moves the resume point: a filtered watch would otherwise resume from before
            # every event of other nodes, and risk a 410 after compaction
            changed = set()
            self._count("bookmarks")
        else:
            log.warning("ignoring watch event of unknown type %r", kind)
            return
        if rv:
            r.rv = str(rv)
        self._notify(changed)
