"""The agent's main loop: start in the right order, enforce, follow changes, stop cleanly.

Signals only queue a request; the loop acts on it between ticks (supervisor's habit), so a
SIGHUP never interrupts a half-written map. Programs stay attached when the agent stops: the
pinned links and maps keep the node enforced until a new agent takes over or
`hostagent uninstall` removes them.
"""

from __future__ import annotations

import enum
import fcntl
import gc
import json
import logging
import os
import select
import hashlib
import signal
import socket
import time
from collections import defaultdict, deque

import psutil

from hostagent import __version__
from hostagent.bpf import abi, loader
from hostagent.bpf.bpffs import ensure_pin_dir
from hostagent.cgroupfs import CgroupRoot, own_cgroup_id, parent_path, resolve_root
from hostagent.cgroupwatch import CgroupWatcher
from hostagent.config import DefaultAction, NodeConfig
from hostagent.enforcement import Enforcement
from hostagent.dns import DnsCollector, Resolver, system_upstreams
from hostagent.errors import ConfigError, HostAgentError, PolicyError
from hostagent.events.aggregate import Aggregator
from hostagent.events.bus import EventBus, SeqFile
from hostagent.events.convert import iso_time
from hostagent.events.log import EventLog
from hostagent.events.spool import Spool
from hostagent.events.reader import DRAIN_INTERVAL, RingReader
from hostagent.events.encode import BootClock, ConnectionEncoder
from hostagent.fqdn import Allowances, DnsGate
from hostagent.identity import credentials
from hostagent.identity.process import ProcessCache
from hostagent.identity.resolver import IdentityResolver, Workload
from hostagent.metrics.collector import AgentMetrics
from hostagent.metrics.server import MetricsServer
from hostagent.policy.bind import Binder
from hostagent.policy.compile import Ruleset, RulesetCache
from hostagent.policy.load import PolicyDirLoader

log = logging.getLogger(__name__)

POLICY_POLL_INTERVAL = 1.0   # seconds between policy directory checks (SIGHUP forces one now)
STATUS_INTERVAL = 1.0        # seconds between status.json refreshes
PATH_REWALK_MIN = 0.05       # seconds: at most one cgroup walk per burst of unknown ids
STATE_LOCK_WAIT = 30.0       # seconds a new agent waits for the previous one to let go
KUBE_SYNC_WAIT = 10.0        # seconds start waits for the first pod list before binding pods


# kubernetes.pendingAction -> the mode of a pending binding (bpf/lib/policy.h __fixed_verdict)
_PENDING_MODES = {DefaultAction.ALLOW: abi.BindingMode.NONE,
                  DefaultAction.AUDIT: abi.BindingMode.AUDIT,
                  DefaultAction.DENY: abi.BindingMode.ENFORCE}
_VERDICT_NAMES = {v: v.name.lower() for v in abi.Verdict}
_IDENTITY_KEYS = tuple(k for k in Workload.event_keys() if k != "cgroup_id")


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


def _now() -> str:
    return iso_time(time.time_ns() // 1000)


def policy_dir_snapshot(path: str) -> tuple:
    """What a change of the policy directory looks like: names, sizes, mtimes, inodes."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except FileNotFoundError:
        return ()
    out = []
    for e in entries:
        if e.name.endswith((".yaml", ".yml")) and not e.name.startswith("."):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out.append((e.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class Agent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.phase = Phase.STARTING
        self.metrics = None
        self.enforcement: Enforcement | None = None
        self.programs: loader.Programs | None = None
        self.root: CgroupRoot | None = None
        self._signals: deque[int] = deque()
        self._binder: Binder | None = None
        self._rulesets: dict[str, Ruleset] = {}
        self._policy_loader = PolicyDirLoader(cfg.policy_dir,
                                              fqdn_min_labels=cfg.dns.fqdn_pattern_min_labels)
        self._ruleset_cache = RulesetCache()   # compiles only the policies that changed
        self._policies = []
        self._paths: dict[int, str] = {}
        self._cgroups: dict[str, int] = {}
        self._last_walk = 0.0
        self._snapshot: tuple = ()
        self._last_reload: dict = {}
        self._ready = False
        self._server: MetricsServer | None = None
        self._events: EventLog | None = None
        self._reader: RingReader | None = None
        self._clock = BootClock()
        self._watch: CgroupWatcher | None = None
        self._pods = None                       # PodWatcher when Kubernetes is on
        self._pod_changes: deque[set[str]] = deque()   # filled by the pod watcher's thread
        self.identity: IdentityResolver | None = None
        self._processes = ProcessCache()
        self.kube_note: str | None = None       # why Kubernetes metadata is off, for status
        self.metrics = AgentMetrics(self)
        self.allowances: Allowances | None = None
        self.dns_gate: DnsGate | None = None
        self.resolver: Resolver | None = None
        self.bus: EventBus | None = None
        self._api = None                        # ApiServer when grpc.listen is set
        self._lost_seen: dict[str, int] = {}    # loss counters already reported, by source
        self._policy_files: list[tuple[str, bytes]] = []   # of the generation in force
        self._last_status: dict = {}
        self._event_counters: dict = {}          # hostagent_events_total children, by verdict
        # events published since the metric was last brought up to date, by verdict
        self._uncounted: dict[str, int] = defaultdict(int)
        self._encoder: ConnectionEncoder | None = None
        self._aggregator = (Aggregator(cfg.aggregate_window) if cfg.aggregate_window > 0
                            else None)

    # -- signals ----------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)

    def ready(self) -> bool:
        return self._ready

    # -- start ------------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        ensure_pin_dir(cfg.bpffs_dir)
        self.root = resolve_root(cfg.cgroup_root)
        log.info("hostagent %s: governing cgroups below %s", __version__, self.root.path)

        self._start_identity()
        self._start_events()
        self._watch = CgroupWatcher(self.root)
        self._set_cgroups(self._watch.start())

        self._snapshot = policy_dir_snapshot(cfg.policy_dir)
        policies, error = self._load_policies()
        pinned = os.path.exists(os.path.join(cfg.bpffs_dir, "hostagent_bindings_v1"))
        if error is not None and not pinned:
            raise error  # nothing is enforced yet and nothing valid to enforce: refuse to start

        t0 = time.monotonic()
        self.programs = loader.Programs(cfg.bpffs_dir, loader.Limits(
            cfg.max_rules, cfg.max_cgroups, cfg.dns.max_allowances),
            optional=frozenset({"sock_ops"} if cfg.connection_close_events else ()))
        log.info("programs compiled and loaded in %.2fs", time.monotonic() - t0)
        self.enforcement = Enforcement(self.programs, cfg.state_dir, cfg.max_rules,
                                       cfg.max_cgroups)
        self.enforcement.write_protected(cfg.metadata.blocked_networks(),
                                         self._encrypted_dns_endpoints())
        if error is None:
            self._install(policies, new_generation=True)
        else:
            # A previous agent's policy is pinned and still enforced; keep it rather than
            # replace it with nothing. The error is reported and the next valid edit applies.
            self._report_reload_failure(error)
        self._start_api()   # before attach: unreadable certificates fail the start first
        self._start_dns()
        for line in self.programs.attach(self.root):
            log.info("%s", line)
        for program in loader.PROGRAMS:   # an optional program not asked for is not attached
            self.metrics.attached.labels(program.name).set(int(program.name in self.programs.fds))

        self._reader = RingReader(self.programs, self._on_event, self._on_close)
        if cfg.metrics_listen is not None:
            host, port = cfg.metrics_listen
            self._server = MetricsServer(host, port, self.metrics.registry, self.ready)
            self._server.start()
            log.info("metrics on http://%s:%d/metrics", *self._server.address)
        # What start-up built (programs, policies, identities) lives as long as the agent. A
        # full collection walks all of it while holding the GIL the resolver's thread needs
        # (tens of ms with large policies: a stall in DNS answers), so it is moved out of the
        # collector's sight, before the agent says it is ready: a new cgroup is bound by the
        # main loop, which this would otherwise keep busy right after "enforcing".
        gc.collect()
        gc.freeze()
        self._ready = error is None or self.enforcement.adopted
        self.metrics.ready.set(1 if self._ready else 0)
        self.phase = Phase.RUNNING
        # The workloads already there: "seen" comes only for cgroups created from now on, so
        # without these a consumer would not know of a workload until it does something.
        for path, cgid in sorted(self._cgroups.items()):
            self._publish_workload("present", path, cgid)
        self._publish({"kind": "agent", "time": _now(), "generation":
                       self.enforcement.state.generation,
                       "agent": {"phase": "started", "adopted": self.enforcement.adopted,
                                 "pid": os.getpid()}})
        self._write_status()
        if self._api is not None:
            self._api.set_serving(self._ready)
        log.info("enforcing (generation %d) in %.2fs, %.2fs after the process started",
                 self.enforcement.state.generation, time.monotonic() - t0,
                 time.time() - psutil.Process().create_time())

    def _start_events(self) -> None:
        """The event stream every event goes through: numbered, kept for subscribers, spooled,
        and written to the event log."""
        cfg = self.cfg
        os.makedirs(cfg.state_dir, exist_ok=True)
        self._lock_state_dir()
        spool = seqfile = None
        if cfg.event_spool_max_bytes:
            spool = Spool(os.path.join(cfg.state_dir, "spool"), cfg.event_spool_max_bytes)
        else:
            seqfile = SeqFile(os.path.join(cfg.state_dir, "events.seq"))
        # what a previous agent already reported of the pinned kernel loss counter
        try:
            with open(os.path.join(cfg.state_dir, "status.json"), encoding="utf-8") as f:
                reported = json.load(f).get("events", {}).get("lost_reported", {})
            self._lost_seen["kernel_ringbuf"] = int(reported.get("kernel_ringbuf", 0))
        except (OSError, ValueError, AttributeError):
            pass
        self.bus = EventBus(cfg.event_buffer, self.identity.node_name, __version__, spool,
                            seqfile)
        self._events = EventLog(cfg.event_log)
        if cfg.event_log:
            self.bus.listeners.append(self._events.write)
        self._encoder = ConnectionEncoder(
            self.identity.node_name, __version__, self._clock, self._policy_name,
            self._rule_name, self._ticket, self._identity_of, self._process_of, self._name_of)
        if seqfile is not None and seqfile.gap is not None:
            first, last = seqfile.gap
            self._publish({"kind": "lost", "time": _now(), "lost": {
                "source": "agent_restart", "count": last - first + 1, "first_seq": first,
                "last_seq": last}})

    def _lock_state_dir(self) -> None:
        """One agent per stateDir: two would number events twice over in one spool. A new agent
        started while the old one is still stopping (a rolling update) waits for it."""
        path = os.path.join(self.cfg.state_dir, "agent.lock")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + STATE_LOCK_WAIT
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"stateDir {self.cfg.state_dir}: another agent holds "
                                      f"{path} (still running?); not starting a second one")
                time.sleep(0.1)

    def _start_api(self) -> None:
        cfg = self.cfg
        if cfg.grpc_listen is None:
            return
        from hostagent.api.server import AgentApi, ApiServer

        tls = ({"cert": cfg.grpc_tls_cert, "key": cfg.grpc_tls_key,
                "clientCA": cfg.grpc_tls_client_ca} if cfg.grpc_tls_cert else None)
        self._api = ApiServer(cfg.grpc_listen, AgentApi(self.bus, lambda: self._last_status,
                                                        self._policy_set,
                                                        cfg.grpc_max_subscribers), tls)
        self._api.start()
        log.info("gRPC event API on %s (%s)", self._api.address,
                 "mutual TLS" if tls and tls["clientCA"] else "TLS" if tls else "plain text")

    def _publish(self, event: dict) -> None:
        self._uncounted[event.get("verdict") or "none"] += 1
        self.bus.publish(event)

    def _count_events(self) -> None:
        """hostagent_events_total, once per tick rather than once per event."""
        for verdict, n in self._uncounted.items():
            if n:
                counter = self._event_counters.get(verdict)
                if counter is None:
                    counter = self._event_counters[verdict] = self.metrics.events.labels(verdict)
                counter.inc(n)
        self._uncounted.clear()

    def _report_losses(self) -> None:
        """A lost record for whatever was dropped before reaching the stream since last time."""
        counts = {"dns_queue": self.dns_gate.events_dropped if self.dns_gate else 0}
        if self.enforcement is not None:
            counts["kernel_ringbuf"] = sum(
                n for (err, _f, _l), n in self.enforcement.errors().items()
                if err == abi.KernelError.RINGBUF_FULL)
        for source, total in counts.items():
            seen = self._lost_seen.setdefault(source, 0)
            if total < seen:   # a counter that restarted (new resolver, unpinned map)
                seen = self._lost_seen[source] = 0
            if total > seen:
                self._publish({"kind": "lost", "time": _now(), "lost": {
                    "source": source, "count": total - seen, "first_seq": 0, "last_seq": 0}})
                self._lost_seen[source] = total

    def _policy_set(self):
        from hostagent.v1 import agent_pb2 as api

        return api.PolicySet(
            generation=self.enforcement.state.generation if self.enforcement else 0,
            policies=[p.name for p in self._policies],
            files=[api.PolicyFile(path=path, sha256=hashlib.sha256(data).hexdigest(),
                                  content=data.decode(errors="replace"))
                   for path, data in self._policy_files],
            default_action=self.cfg.default_action.name.lower())

    def _start_dns(self) -> None:
        """The node resolver, listening before the kernel is told to send DNS to it: a query
        redirected earlier would find nothing there and fail, not escape."""
        cfg = self.cfg.dns
        self.allowances = Allowances(self.programs, self.enforcement, cfg.ttl_grace,
                                     cfg.max_allowances)
        self.enforcement.extra_fill["fqdn"] = lambda: (len(self.allowances),
                                                        self.allowances.capacity)
        if not cfg.enabled:
            self.enforcement.write_dns_config(None, cfg.socket_mark, 0, ())
            return
        self.dns_gate = DnsGate(self.programs, self.enforcement, self.allowances, cfg,
                                self.cfg.default_action, self._binding_of)
        self.enforcement.on_rebind = self._on_rebind
        upstreams = cfg.upstreams or system_upstreams()
        from hostagent.dns.interface import ensure_listen_address

        ensure_listen_address(cfg.listen[0], cfg.interface)
        resolver = Resolver(cfg, self.dns_gate, upstreams=upstreams)
        resolver.start()
        self.resolver = resolver   # only once it runs: status and teardown rely on it
        self._dns_listen = "%s:%d" % self.resolver.address
        self.metrics.registry.register(
            DnsCollector(self.resolver, on_error=self.metrics.collector_errors.inc))
        self.enforcement.write_dns_config(self.resolver.address, cfg.socket_mark,
                                          own_cgroup_id(self.root), cfg.encrypted_dns_ports)
        log.info("DNS resolver on %s:%d, upstreams %s", *self.resolver.address,
                 ", ".join(f"{h}:{p}" for h, p in upstreams) or "none")

    def _binding_of(self, cgid: int) -> tuple | None:
        """The binding the kernel finds for a cgroup: its own, else its nearest bound
        ancestor's (a cgroup created since the last bind). Called from the resolver thread."""
        b = self.enforcement.binding(cgid)
        if b is not None:
            return b
        path = self._paths.get(cgid)
        while path and (path := parent_path(path)) is not None:
            parent = self._cgroups.get(path)
            if parent is not None and (b := self.enforcement.binding(parent)) is not None:
                return b
        return None

    def _on_rebind(self, cgids: set[int]) -> None:
        """Bindings changed: the resolver forgets what it decided, and DNS allowances keep
        only what the new policy still allows."""
        self.resolver.invalidate()
        gone = {c for c in cgids if self.enforcement.binding(c) is None}
        self.allowances.forget(gone)
        self.allowances.rebound(cgids - gone, self.dns_gate.recheck)

    def _drain_dns_events(self) -> None:
        gate = self.dns_gate
        if gate is None:
            return
        while gate.events:
            event = gate.events.popleft()
            workload = event.get("workload") or {}
            cgid = workload.get("cgroup_id")
            if cgid is not None:
                event["workload"] = {**self._identity_of(cgid), **workload}
            self._publish(event)

    def _start_identity(self) -> None:
        """Pod metadata from the Kubernetes API when there is a cluster; cgroup-derived
        identity alone otherwise, and status says which."""
        cfg = self.cfg
        node = cfg.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
        if cfg.kube_enabled != "false":
            missing = credentials.missing(cfg.kubeconfig)
            client = None
            if missing is None or cfg.kube_enabled == "true":
                # only now: the client library's import is a noticeable part of a start
                from hostagent.identity.kube import PodWatcher, make_api_client

                try:
                    client = make_api_client(cfg.kubeconfig)
                except ConfigError as err:
                    if cfg.kube_enabled == "true":
                        raise
                    missing = str(err)
            if client is None:
                self.kube_note = f"no cluster credentials ({missing}); cgroup-derived identity only"
                log.info("Kubernetes metadata off: %s", self.kube_note)
            else:
                self._pods = PodWatcher(client, node, self._pod_changes.append)
                self._pods.start()
                if not self._pods.wait_synced(KUBE_SYNC_WAIT):
                    log.warning("pods of node %s not listed within %.0fs (%s): unknown pods get "
                                "the pending action until they are", node, KUBE_SYNC_WAIT,
                                self._pods.last_error)
        else:
            self.kube_note = "disabled by kubernetes.enabled: false"
        self.identity = IdentityResolver(
            node_name=node, trust_domain=cfg.trust_domain,
            unit_template=cfg.unit_spiffe_template,
            container_template=cfg.container_spiffe_template, pods=self._pods)

    def _namespace_labels(self, name: str):
        ns = self._pods.namespace(name) if self._pods else None
        return ns.label_dict() if ns else None

    def _load_policies(self):
        try:
            t0 = time.monotonic()
            policies = self._policy_loader.load()   # parses only the files that changed
            t1 = time.monotonic()
            rulesets = self._ruleset_cache.compile(policies, self._protected_networks())
            log.info("policies read in %.2fs (%d files parsed, the others unchanged), compiled "
                     "in %.2fs (%d of %d policies)", t1 - t0, len(self._policy_loader.parsed),
                     time.monotonic() - t1, len(self._ruleset_cache.compiled), len(rulesets))
            return (policies, rulesets, self._policy_loader.files), None
        except PolicyError as err:
            return None, err

    def _encrypted_dns_endpoints(self) -> tuple:
        """Blocked only where the resolver is there to take their place."""
        return self.cfg.dns.encrypted_dns_endpoints if self.cfg.dns.enabled else ()

    def _protected_networks(self) -> tuple:
        return (*self.cfg.metadata.blocked_networks(), *self._encrypted_dns_endpoints())

    def _set_cgroups(self, cgroups: dict[str, int]) -> None:
        self._cgroups = dict(cgroups)
        self._paths = {cgid: path for path, cgid in self._cgroups.items()}
        self._last_walk = time.monotonic()
        self.metrics.cgroups.set(len(self._cgroups))

    def _walk(self) -> dict[str, int]:
        """Catch up with cgroupfs: the watcher's rescan, applied like its events."""
        if self._watch is not None:
            self._on_cgroup_events(self._watch.rescan())
        else:
            self._set_cgroups(self.root.walk())
        self._last_walk = time.monotonic()
        return self._cgroups

    def _new_binder(self, policies) -> Binder:
        pending = _PENDING_MODES[self.cfg.pending_action]
        return Binder(policies, self.cfg.metadata.exempt, identify=self.identity.identify,
                      namespace_labels=self._namespace_labels, pending_mode=pending)

    def _install(self, loaded, new_generation: bool) -> dict:
        policies, rulesets, files = loaded
        binder = self._new_binder(policies)
        bindings = binder.bind(self._cgroups)
        result = self.enforcement.apply(rulesets, bindings, self.cfg.default_action,
                                        self.cfg.emit_allow_events, new_generation)
        previous = self._policies
        self._binder, self._rulesets, self._policies = binder, rulesets, policies
        self.metrics.generation.set(result["generation"])
        if new_generation:
            self.metrics.reloads.labels("success").inc()
            self._last_reload = {"time": time.time(), "ok": True, "generation":
                                 result["generation"], "policies": len(policies),
                                 "result": result}
            log.info("policy generation %d in force: %d policies, %s", result["generation"],
                     len(policies), result)
            self._publish_policy_change(True, result["generation"], policies, files, previous)
        self._policy_files = files
        return result

    def _report_reload_failure(self, err: HostAgentError) -> None:
        self.metrics.reloads.labels("failure").inc()
        self._last_reload = {"time": time.time(), "ok": False, "error": str(err),
                             "generation": self.enforcement.state.generation
                             if self.enforcement else 0}
        log.error("policy rejected, generation %s stays in force:\n%s",
                  self._last_reload["generation"], err)
        self._publish_policy_change(False, self._last_reload["generation"], self._policies,
                                    self._policy_files, self._policies, error=str(err))

    def _publish_policy_change(self, ok: bool, generation: int, policies, files, previous,
                               error: str | None = None) -> None:
        """What changed, by policy name and by file (compared with the generation before)."""
        before = {p.name: p for p in previous}
        after = {p.name: p for p in policies}
        # compared with the files in force: the new generation's, or (rejected) what the loader
        # found on disk
        old_files = dict(self._policy_files)
        new_files = dict(files) if ok else self._policy_loader.read
        changed_files = sorted(path for path in set(old_files) | set(new_files)
                               if old_files.get(path) != new_files.get(path))
        self._publish({"kind": "policy", "time": _now(), "generation": generation,
                       "policy_change": {
                           "ok": ok, "policies": sorted(after),
                           "added": sorted(set(after) - set(before)),
                           "removed": sorted(set(before) - set(after)),
                           "changed": sorted(n for n in set(after) & set(before)
                                             if after[n] != before[n]),
                           "files": changed_files, "error": error}})

    # -- running ----------------------------------------------------------------------------------

    def reload(self) -> None:
        self._snapshot = policy_dir_snapshot(self.cfg.policy_dir)
        loaded, error = self._load_policies()
        if error is None:
            try:
                self._install(loaded, new_generation=True)
                return
            except HostAgentError as err:
                error = err
        self._report_reload_failure(error)

    def resync(self) -> None:
        """The safety net under the cgroup and pod watches: a full walk and a full bind."""
        if self._binder is None:
            return
        self._walk()
        bindings = self._binder.bind(self._cgroups)
        self.enforcement.apply(self._rulesets, bindings, self.cfg.default_action,
                               self.cfg.emit_allow_events, new_generation=False)

    def _on_cgroup_events(self, events) -> None:
        """Bind new cgroups and free removed ones, one map update each."""
        if not events:
            return
        created, removed_ids, removed_paths = [], [], []
        for ev in events:
            if ev.kind == "created":
                self._cgroups[ev.path] = ev.cgroup_id
                self._paths[ev.cgroup_id] = ev.path
                created.append(ev.path)
            else:
                if self._cgroups.get(ev.path) == ev.cgroup_id:
                    del self._cgroups[ev.path]
                self._paths.pop(ev.cgroup_id, None)
                removed_ids.append(ev.cgroup_id)
                removed_paths.append(ev.path)
        created = [p for p in created if p in self._cgroups]
        self.metrics.cgroups.set(len(self._cgroups))
        for path in created:
            self._publish_workload("seen", path, self._cgroups[path])
        for path, cgid in zip(removed_paths, removed_ids):
            self._publish_workload("gone", path, cgid)
            self.identity.forget(path)
        if self._binder is None:
            return
        self._binder.forget(removed_paths)
        specs = self._binder.rebind(created, self._cgroups)
        try:
            self.enforcement.update_bindings(specs, removed_ids)
        except HostAgentError as err:
            # new cgroups stay under their nearest bound ancestor in the kernel meanwhile
            log.error("binding %d new cgroups failed: %s", len(specs), err)

    def _publish_workload(self, change: str, path: str, cgid: int) -> None:
        fields = self.identity.identify(path, cgid).as_event()
        self._publish({"kind": "workload", "time": _now(), "change": change,
                       "workload": fields})

    def _on_pod_changes(self) -> None:
        """Rebind the cgroups of pods whose metadata changed (labels, new pods, deletions)."""
        uids: set[str] = set()
        while self._pod_changes:
            uids |= self._pod_changes.popleft()
        if not uids or self._binder is None:
            return
        paths = self.identity.pods_changed(uids)
        self._encoder.reset()   # events name the pods' new metadata from now on
        specs = self._binder.rebind(paths, self._cgroups)
        if specs:
            try:
                self.enforcement.update_bindings(specs)
            except HostAgentError as err:
                # the previous bindings stay in force; the periodic resync tries again
                log.error("rebinding %d cgroups of changed pods failed: %s", len(specs), err)
                return
            log.info("rebound %d cgroups of %d changed pods", len(specs), len(uids))

    def _cgroup_path(self, cgid: int) -> str | None:
        path = self._paths.get(cgid)
        if path is None and time.monotonic() - self._last_walk > PATH_REWALK_MIN:
            self._walk()
            path = self._paths.get(cgid)
        return path

    def _rule_name(self, ruleset_id: int, rule: int) -> str | None:
        info = self.enforcement.by_id.get(ruleset_id)
        if info is None or rule >= len(info.rule_names):
            return f"egress[{rule}]"
        return info.rule_names[rule]

    def _ticket(self, ruleset_id: int, rule: int) -> str | None:
        info = self.enforcement.by_id.get(ruleset_id)
        if info is None or rule >= len(info.rule_tickets):
            return None
        return info.rule_tickets[rule]

    def _identity_of(self, cgid: int) -> dict:
        path = self._cgroup_path(cgid)
        if path is None:   # removed before its event was read: every key, nothing guessed
            return {key: None for key in _IDENTITY_KEYS}
        fields = self.identity.identify(path, cgid).as_event()
        fields.pop("cgroup_id", None)
        return fields

    def _process_of(self, pid: int, tid: int, comm: str) -> dict | None:
        info = self._processes.lookup(pid, comm, tid=tid)
        if info is None:
            return None
        # a process that exec'd since the event is not the one that connected
        if not info.matches_kernel:
            return {"exe": None, "ppid": None}
        return {"exe": info.exe, "ppid": info.ppid}

    def _on_event(self, e: abi.Event, count: int = 0) -> None:
        if (self._aggregator is not None and not count and e.verdict == abi.Verdict.ALLOW
                and self._aggregator.absorb(e)):
            return
        seq = self.bus.next_seq()
        self.bus.publish_encoded(seq, self._encoder.encode(e, seq, count))
        self._uncounted[_VERDICT_NAMES.get(e.verdict, "none")] += 1

    def _on_close(self, c: abi.CloseEvent) -> None:
        seq = self.bus.next_seq()
        self.bus.publish_encoded(seq, self._encoder.encode_close(c, seq))
        self._uncounted[_VERDICT_NAMES.get(c.event.verdict, "none")] += 1

    def _policy_name(self, policy_id: int) -> str:
        return self.enforcement.policy_name(policy_id)

    def _name_of(self, cgid: int, daddr: bytes) -> str | None:
        return self.allowances.name_of(cgid, daddr) if self.allowances is not None else None

    def _flush_aggregates(self) -> None:
        for count, last in self._aggregator.close_window():
            self._on_event(last, count)

    def _identity_status(self) -> dict:
        out = {"kubernetes": self.identity.kubernetes_state if self.identity else "disabled",
               "note": self.kube_note,
               "conflicts": dict(self._binder.conflicts) if self._binder else {}}
        if self._pods is not None:
            out.update(node=self._pods.node_name, pods=len(self._pods.pods()),
                       last_error=self._pods.last_error, watch=self._pods.stats)
        if self._watch is not None:
            out["cgroup_watch"] = self._watch.stats
        return out

    def _dns_status(self) -> dict:
        if self.resolver is None:
            return {"enabled": False}
        a = self.allowances
        return {"enabled": True, "listen": self._dns_listen,
                "resolver": self.resolver.stats(),
                "allowances": {"open": len(a), "capacity": a.capacity, "granted": a.granted,
                               "expired": a.expired, "refused_full": a.failures},
                "events_dropped": self.dns_gate.events_dropped}

    def _events_status(self) -> dict:
        bus = self.bus
        if bus is None:
            return {}
        return {"last_seq": bus.last_seq, "oldest_seq": bus.oldest_seq,
                "subscribers": bus.subscribers, "lost_by_subscribers": bus.lost_by_subscribers,
                "lost_reported": dict(self._lost_seen),
                "lost": sum(self._lost_seen.values()),
                "grpc": ({"listen": self._api.address, "tls": self._api.tls}
                         if self._api is not None else None)}

    def _write_status(self) -> None:
        status = {
            "pid": os.getpid(), "version": __version__, "time": time.time(),
            "phase": self.phase.value, "ready": self._ready,
            "cgroup_root": self.root.path if self.root else None,
            "generation": self.enforcement.state.generation if self.enforcement else 0,
            "policies": [p.name for p in self._policies],
            "last_reload": self._last_reload,
            "map_fill": self.enforcement.fill() if self.enforcement else {},
            "cgroups": len(self._cgroups),
            "events_received": self._reader.received if self._reader else 0,
            "identity": self._identity_status(),
            "dns": self._dns_status(),
            "events": self._events_status(),
        }
        self._last_status = status   # what GetStatus answers: built here, on the main thread
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        path = os.path.join(self.cfg.state_dir, "status.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(status, f)
        os.replace(path + ".tmp", path)

    def run(self) -> int:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            self.start()
            next_poll = next_resync = next_status = time.monotonic()
            while self.phase is Phase.RUNNING:
                while self._signals:
                    signum = self._signals.popleft()
                    if signum == signal.SIGHUP:
                        # the 1 s poll often gets to an edit first; reloading the same files
                        # again would only cost another full compile
                        if (policy_dir_snapshot(self.cfg.policy_dir) == self._snapshot
                                and self._last_reload and self._last_reload["ok"]):
                            log.info("SIGHUP: policy directory unchanged since generation %d",
                                     self.enforcement.state.generation)
                        else:
                            log.info("SIGHUP: reloading policies")
                            self.reload()
                    else:
                        log.info("%s: stopping (enforcement stays pinned)",
                                 signal.Signals(signum).name)
                        self.phase = Phase.STOPPING
                if self.phase is not Phase.RUNNING:
                    break
                more = self._reader.drain()
                self._drain_dns_events()
                if self._aggregator is not None and self._aggregator.due():
                    self._flush_aggregates()
                self.bus.wake()
                self._count_events()
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + POLICY_POLL_INTERVAL
                    if policy_dir_snapshot(self.cfg.policy_dir) != self._snapshot:
                        log.info("policy directory changed: reloading")
                        self.reload()
                if now >= next_resync:
                    next_resync = now + self.cfg.resync_interval
                    self.resync()
                    if self.allowances is not None:
                        self.allowances.sweep()
                if now >= next_status:
                    next_status = now + STATUS_INTERVAL
                    self._report_losses()
                    self._clock.resync()
                    self._encoder.reset()   # identity and process details at most 1 s stale
                    self._write_status()
                if self._pod_changes:
                    self._on_pod_changes()
                # wake for a new cgroup at once: it is bound before its first connect can
                # matter; otherwise this is the ring buffer's drain tick
                ready, _, _ = select.select([self._watch.fileno()], [], [],
                                            0 if more else DRAIN_INTERVAL)
                if ready:
                    self._on_cgroup_events(self._watch.read())
            return 0
        finally:
            self._teardown()

    def _teardown(self) -> None:
        """Reverse start order. Never detaches: that is `hostagent uninstall`'s job."""
        self.phase = Phase.STOPPING
        if self._reader is not None:
            try:
                while self._reader.drain():   # what is already queued still reaches the log
                    pass
                if self._aggregator is not None:
                    self._flush_aggregates()
            except Exception:  # noqa: BLE001 - teardown goes on whatever the ring says
                log.exception("final ring buffer drain failed")
        if self.resolver is not None:
            self.resolver.stop()
            self._drain_dns_events()
        if self.bus is not None:
            try:
                self._report_losses()
                self._publish({"kind": "agent", "time": _now(), "generation":
                               self.enforcement.state.generation if self.enforcement else 0,
                               "agent": {"phase": "stopping", "pid": os.getpid()}})
            finally:
                if self._api is not None:
                    self._api.stop()
                self.bus.close()
                self._count_events()
        if self._server is not None:
            self._server.stop()
        if self._pods is not None:
            self._pods.stop()
        if self._watch is not None:
            self._watch.close()
        if self._events is not None:
            self._events.close()
        if self.root is not None and self.enforcement is not None:
            self._write_status()
        if self.programs is not None:
            self.programs.close()
