"""A small fake Kubernetes API server that speaks the real list/watch protocol, for tests.

Only what an agent watching pods and namespaces uses, but that part faithfully, after
dnspython's tests/nanonameserver.py: a real HTTP/1.1 server on 127.0.0.1 and an ephemeral
port, so the official client is exercised unmodified.

- GET /api/v1/pods and /api/v1/namespaces: lists ({"kind": "PodList", "metadata":
  {"resourceVersion": ...}, "items": [...]}), with fieldSelector=spec.nodeName=<n> really
  applied (other selectors get 400, as the API server answers for unsupported fields).
- ...&watch=true&resourceVersion=RV: a chunked stream of newline-delimited
  {"type": ..., "object": ...} events after RV, held open until timeoutSeconds. A pod that
  starts or stops matching the field selector is ADDED/DELETED for that watch, as the watch
  cache does. Without a resourceVersion (or with "0") the stream starts with ADDED events for
  the current objects.
- One resourceVersion counter for everything (like etcd's revision). compact() drops the
  history: a watch from an older RV then gets 200 + an ERROR event with a 410 Status (what the
  API server does), or a plain HTTP 410 with gone_mode="http".
- send_bookmarks(), drop_watches() (abrupt close, no end-of-stream chunk), freeze() (open
  watches stop delivering, like a lagging watch cache), down()/up() (the listener goes away
  and comes back on the same port, state kept).
- An optional bearer token; every request is recorded (path, query, Authorization).

Everything is bounded: watches wake at least every WAKE_INTERVAL, close() joins with a
deadline.
"""

from __future__ import annotations

import contextlib
import copy
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.harness import wait_for  # noqa: F401 - re-exported for the kube tests

WAKE_INTERVAL = 0.05       # how often an idle watch re-checks drop/close flags
DEFAULT_WATCH_TIMEOUT = 60  # the real server picks 30-60 min; tests always pass their own
FIRST_RV = 1000


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    time: float

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def container_status(name: str, container_id: str) -> dict[str, Any]:
    """A containerStatuses entry; container_id "" means not created yet (waiting)."""
    cs: dict[str, Any] = {"name": name, "image": f"registry.example/{name}:1.0",
                          "imageID": "", "ready": bool(container_id), "restartCount": 0,
                          "started": bool(container_id)}
    if container_id:
        cs["containerID"] = container_id
        cs["state"] = {"running": {"startedAt": _now()}}
    else:
        cs["state"] = {"waiting": {"reason": "ContainerCreating"}}
    return cs


def make_pod(namespace: str, name: str, *, node: str, uid: str,
             labels: Mapping[str, str] | None = None, service_account: str = "default",
             containers: Sequence[tuple[str, str]] = (),
             init_containers: Sequence[tuple[str, str]] = (),
             ephemeral_containers: Sequence[tuple[str, str]] = (),
             phase: str = "Running") -> dict[str, Any]:
    """A Pod as the API server serves it; containers are (name, containerID) pairs."""
    def spec_list(pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"name": n, "image": f"registry.example/{n}:1.0"} for n, _ in pairs]

    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "",
                     "creationTimestamp": _now(), "labels": dict(labels or {})},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "serviceAccount": service_account,
                 "containers": spec_list(containers) or [{"name": "main", "image": "x"}],
                 "initContainers": spec_list(init_containers),
                 "ephemeralContainers": spec_list(ephemeral_containers)},
        "status": {"phase": phase, "podIP": "10.0.0.1",
                   "containerStatuses": [container_status(n, c) for n, c in containers],
                   "initContainerStatuses": [container_status(n, c)
                                             for n, c in init_containers],
                   "ephemeralContainerStatuses": [container_status(n, c)
                                                  for n, c in ephemeral_containers]},
    }


def make_namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    # the API server always adds kubernetes.io/metadata.name (since 1.21)
    all_labels = {**(labels or {}), "kubernetes.io/metadata.name": name}
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "",
                         "creationTimestamp": _now(), "labels": all_labels},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def write_kubeconfig(path: str | Path, server: str, token: str | None = None) -> str:
    """A kubeconfig for server (JSON, which is YAML) with an optional bearer token."""
    user: dict[str, Any] = {"token": token} if token else {}
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
           "clusters": [{"name": "test", "cluster": {"server": server}}],
           "users": [{"name": "test", "user": user}],
           "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}
    Path(path).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return str(path)


@dataclass(slots=True)
class _Event:
    rv: int
    type: str           # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


class _Resource:
    def __init__(self, name: str, list_kind: str, kind: str) -> None:
        self.name, self.list_kind, self.kind = name, list_kind, kind
        self.objects: dict[str, dict[str, Any]] = {}
        self.events: list[_Event] = []
        self.open_watches = 0


class FakeKubeAPI:
    """See the module docstring. Use as a context manager, or call close()."""

    def __init__(self, *, token: str | None = None, gone_mode: str = "event") -> None:
        if gone_mode not in ("event", "http"):
            raise ValueError(repr(gone_mode))
        self.token = token
        self.gone_mode = gone_mode
        self._cond = threading.Condition()
        self._rv = FIRST_RV
        self._compacted = 0
        self._bookmark_gen = 0
        self._drop_gen = 0
        self._frozen = False
        self._closing = False
        self._resources = {"pods": _Resource("pods", "PodList", "Pod"),
                           "namespaces": _Resource("namespaces", "NamespaceList", "Namespace")}
        self._requests: list[Request] = []
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self.port = 0
        self.up()

    # -- server lifecycle ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again, on the same port after down())."""
        if self._httpd is not None:
            return
        handler = type("Handler", (_Handler,), {"api": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False   # we join our handler threads ourselves, with a deadline
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(target=httpd.serve_forever,
                                              kwargs={"poll_interval": 0.05},
                                              name="fake-kubeapi", daemon=True)
        self._serve_thread.start()

    def down(self, timeout: float = 2.0) -> None:
        """Stop listening and cut every connection (requests now see connection refused)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        deadline = time.monotonic() + timeout
        httpd.shutdown()
        httpd.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._drop_gen += 1
            conns = list(self._conns)
            self._cond.notify_all()
        for conn in conns:
            _shutdown(conn)
        with self._cond:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.down(timeout)

    def __enter__(self) -> FakeKubeAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kubeconfig(self, path: str | Path, token: str | None = None) -> str:
        return write_kubeconfig(path, self.url, token)

    # -- what happened ------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._requests)

    def requests_for(self, resource: str, *, watch: bool | None = None) -> list[Request]:
        return [r for r in self.requests if r.path == f"/api/v1/{resource}"
                and (watch is None or r.watch == watch)]

    def open_watches(self, resource: str = "pods") -> int:
        with self._cond:
            return self._resources[resource].open_watches

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    # -- mutations ----------------------------------------------------------------------

    def _commit(self, resource: str, etype: str, key: str, obj: dict[str, Any]) -> int:
        with self._cond:
            res = self._resources[resource]
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            old = res.objects.get(key)
            if etype == "DELETED":
                res.objects.pop(key, None)
            else:
                res.objects[key] = obj
            res.events.append(_Event(self._rv, etype, obj, old))
            self._cond.notify_all()
            return self._rv

    def _get(self, resource: str, key: str) -> dict[str, Any]:
        with self._cond:
            return copy.deepcopy(self._resources[resource].objects[key])

    def add_pod(self, namespace: str, name: str, *, node: str, uid: str | None = None,
                **kwargs: Any) -> str:
        """Create a pod (see make_pod for kwargs); returns its uid."""
        uid = uid or str(uuid.uuid4())
        self._commit("pods", "ADDED", uid, make_pod(namespace, name, node=node, uid=uid,
                                                    **kwargs))
        return uid

    def update_pod(self, uid: str, *, labels: Mapping[str, str] | None = None,
                   phase: str | None = None, node: str | None = None,
                   containers: Sequence[tuple[str, str]] | None = None,
                   annotations: Mapping[str, str] | None = None) -> int:
        pod = self._get("pods", uid)
        if labels is not None:
            pod["metadata"]["labels"] = dict(labels)
        if annotations is not None:
            pod["metadata"]["annotations"] = dict(annotations)
        if phase is not None:
            pod["status"]["phase"] = phase
        if node is not None:
            pod["spec"]["nodeName"] = node
        if containers is not None:
            pod["status"]["containerStatuses"] = [container_status(n, c) for n, c in containers]
        return self._commit("pods", "MODIFIED", uid, pod)

    def delete_pod(self, uid: str) -> int:
        return self._commit("pods", "DELETED", uid, self._get("pods", uid))

    def add_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> int:
        return self._commit("namespaces", "ADDED", name, make_namespace(name, labels))

    def update_namespace_labels(self, name: str, labels: Mapping[str, str]) -> int:
        ns = self._get("namespaces", name)
        ns["metadata"]["labels"] = {**labels, "kubernetes.io/metadata.name": name}
        return self._commit("namespaces", "MODIFIED", name, ns)

    def delete_namespace(self, name: str) -> int:
        return self._commit("namespaces", "DELETED", name, self._get("namespaces", name))

    # -- protocol events ----------------------------------------------------------------

    def compact(self) -> int:
        """Forget history: watches from an RV older than now get 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            for res in self._resources.values():
                res.events = [e for e in res.events if e.rv > self._compacted]
            return self._compacted

    def send_bookmarks(self) -> None:
        """Every open watch that asked for bookmarks gets one at the current RV."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch stream mid-stream (no terminating chunk)."""
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def freeze(self) -> Iterator[None]:
        """While frozen, watches deliver nothing (changes pile up, as in a lagging cache)."""
        with self._cond:
            self._frozen = True
        try:
            yield
        finally:
            with self._cond:
                self._frozen = False
                self._cond.notify_all()

    # -- serving (called by the handler) --------------------------------------------------

    def _record(self, req: Request) -> None:
        with self._cond:
            self._requests.append(req)

    def _register(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
                self._threads.add(threading.current_thread())
            else:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def _list(self, res: _Resource, match: Any) -> dict[str, Any]:
        with self._cond:
            items = [copy.deepcopy(o) for o in res.objects.values() if match(o)]
            return {"kind": res.list_kind, "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def _selector(resource: str, query: Mapping[str, str]) -> Any:
    """A predicate for the fieldSelector, or a str error (what the API server answers 400 for)."""
    text = query.get("fieldSelector", "")
    terms = [t for t in text.split(",") if t]
    checks = []
    for term in terms:
        negate = "!=" in term
        fieldname, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if resource == "pods" and fieldname == "spec.nodeName":
            path = ("spec", "nodeName")
        elif fieldname == "metadata.name":
            path = ("metadata", "name")
        elif fieldname == "metadata.namespace" and resource == "pods":
            path = ("metadata", "namespace")
        else:
            return f'field label not supported: {fieldname}'
        checks.append((path, value, negate))

    def match(obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        for (a, b), value, negate in checks:
            if ((obj.get(a) or {}).get(b, "") == value) == negate:
                return False
        return True

    return match


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive and chunked transfer encoding, as the real one
    api: FakeKubeAPI                # set on the per-server subclass
    timeout = 30                    # an idle keep-alive connection does not hold a thread forever

    def setup(self) -> None:
        super().setup()
        self.api._register(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.api._register(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass  # tests read the request log instead

    def _send_json(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        auth = self.headers.get("Authorization")
        self.api._record(Request("GET", url.path, query, auth, time.monotonic()))
        if self.api.token is not None and auth != f"Bearer {self.api.token}":
            self._send_json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        resource = {"/api/v1/pods": "pods", "/api/v1/namespaces": "namespaces"}.get(url.path)
        if resource is None:
            self._send_json(404, status(404, "NotFound", "the server could not find the "
                                                         "requested resource"))
            return
        res = self.api._resources[resource]
        match = _selector(resource, query)
        if isinstance(match, str):
            self._send_json(400, status(400, "BadRequest", match))
            return
        if query.get("watch") in ("true", "1"):
            self._watch(res, match, query)
        else:
            self._send_json(200, self.api._list(res, match))

    # -- watch --------------------------------------------------------------------------

    def _chunk(self, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _watch(self, res: _Resource, match: Any, query: Mapping[str, str]) -> None:
        api = self.api
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
            rv_text = query.get("resourceVersion", "")
            start_rv = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            self._send_json(400, status(400, "BadRequest", "invalid resourceVersion or "
                                                           "timeoutSeconds"))
            return
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        with api._cond:
            gone = start_rv is not None and start_rv < api._compacted
            compacted = api._compacted
            if start_rv is None:
                cursor = api._rv
                initial = [copy.deepcopy(o) for o in res.objects.values() if match(o)]
            else:
                cursor, initial = start_rv, []
            bookmark_gen, drop_gen = api._bookmark_gen, api._drop_gen
            res.open_watches += 1
        try:
            expired = status(410, "Expired",
                             f"too old resource version: {start_rv} ({compacted})")
            if gone and api.gone_mode == "http":
                self._send_json(410, expired)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if gone:
                self._chunk({"type": "ERROR", "object": expired})
                self._end()
                return
            for obj in initial:
                self._chunk({"type": "ADDED", "object": obj})
            self._stream(res, match, cursor, bookmarks, bookmark_gen, drop_gen,
                         time.monotonic() + timeout)
        except OSError:
            self.close_connection = True   # the client went away
        finally:
            with api._cond:
                res.open_watches -= 1

    def _peer_closed(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(self, res: _Resource, match: Any, cursor: int, bookmarks: bool,
                bookmark_gen: int, drop_gen: int, deadline: float) -> None:
        api = self.api
        while True:
            with api._cond:
                dropped = api._drop_gen != drop_gen or api._closing
                pending = [] if api._frozen else [e for e in res.events if e.rv > cursor]
                bookmark = bookmarks and api._bookmark_gen != bookmark_gen
                bookmark_gen = api._bookmark_gen
                frozen = api._frozen
                now_rv = api._rv
                remaining = deadline - time.monotonic()
                if not (dropped or pending or bookmark or remaining <= 0):
                    api._cond.wait(min(WAKE_INTERVAL, remaining))
                    idle = True
                else:
                    idle = False
            if idle:
                if self._peer_closed():
                    # like Go's net/http, notice a client that hung up on an idle stream
                    self.close_connection = True
                    return
                continue
            if dropped:
                # abrupt: no end-of-stream chunk, the connection just goes away
                self.close_connection = True
                _shutdown(self.connection)
                return
            for e in pending:
                cursor = e.rv
                was, now = match(e.old), match(e.obj)
                if e.type == "DELETED":
                    etype = "DELETED" if was else None
                elif now:
                    etype = "MODIFIED" if was else "ADDED"
                else:
                    etype = "DELETED" if was else None   # left the selector
                if etype is not None:
                    self._chunk({"type": etype, "object": e.obj})
            if bookmark:
                # everything up to now_rv was in pending (same lock), unless frozen: then the
                # bookmark must not claim events this watch has not been sent
                if not frozen:
                    cursor = max(cursor, now_rv)
                self._chunk({"type": "BOOKMARK", "object": {
                    "kind": res.kind, "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(cursor)}}})
            if remaining <= 0:
                self._end()
                return
