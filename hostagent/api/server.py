"""The agent's gRPC endpoint: hostagent.v1.AgentService, gRPC health and reflection.

GetEvents is a server stream of EventBatch messages. A batch is the bus's already-framed events
joined (a repeated field on the wire is each element's tag, length and bytes, one after
another), so an event is serialized once however many subscribers read it and no Event object
is rebuilt per subscriber. Each stream is a cursor into the bus running in
its own server thread: a subscriber that stops reading blocks only its own thread (gRPC flow
control), never the agent.

Transport security: TLS with the node's certificate, and mutual TLS when a client CA is given
(a client without a certificate from that CA fails the handshake and gets nothing). Plain
text is refused unless the address is loopback or a Unix socket.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hostagent.converters import is_local
from hostagent.errors import ConfigError
from hostagent.events.bus import EventBus
from hostagent.events.convert import KIND_NAMES, VERDICT_NAMES
from hostagent.events.filter import EventFilter, FilterError
from hostagent.v1 import agent_pb2 as api

log = logging.getLogger(__name__)

SERVICE = "hostagent.v1.AgentService"
DEFAULT_BATCH = 512          # events per message: large enough that framing costs nothing
MAX_BATCH = 4096
WAIT_SLICE = 0.5             # seconds a stream sleeps before it checks its client is still there


class AgentApi:
    def __init__(self, bus: EventBus, status: Callable[[], dict],
                 policy: Callable[[], api.PolicySet], max_streams: int = 16) -> None:
        self.bus = bus
        self._status = status
        self._policy = policy
        self.max_streams = max_streams

    # -- AgentService ------------------------------------------------------------------------------

    def get_events(self, request: api.GetEventsRequest, context: grpc.ServicerContext):
        try:
            flt = EventFilter.build(
                kinds=[KIND_NAMES.get(k, "") for k in request.kinds],
                verdicts=[VERDICT_NAMES.get(v, "") for v in request.verdicts],
                workloads=request.workloads, destinations=request.destinations)
        except FilterError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        bus = self.bus
        if request.from_oldest:
            cursor = bus.oldest_seq - 1
        elif request.since:
            cursor = request.since
        else:
            cursor = bus.sent_seq
        limit = min(request.max_batch or DEFAULT_BATCH, MAX_BATCH)
        with bus.subscription():
            while context.is_active() and not bus.closed:
                if cursor >= bus.sent_seq and not bus.wait(cursor, WAIT_SLICE):
                    continue
                events, cursor = bus.read(cursor, limit, flt)
                if events:
                    yield b"".join(events)

    def get_status(self, _request, _context) -> api.Status:
        s = self._status()
        return api.Status(node=self.bus.node, agent_version=self.bus.version,
                          phase=s.get("phase", ""), ready=bool(s.get("ready")),
                          generation=s.get("generation") or 0,
                          policies=s.get("policies") or [], last_seq=self.bus.sent_seq,
                          oldest_seq=self.bus.oldest_seq,
                          events_lost=(s.get("events") or {}).get("lost", 0),
                          subscribers=self.bus.subscribers,
                          status_json=json.dumps(s, default=str))

    def get_policy(self, _request, _context) -> api.PolicySet:
        return self._policy()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "GetEvents": grpc.unary_stream_rpc_method_handler(
                self.get_events, request_deserializer=api.GetEventsRequest.FromString,
                response_serializer=bytes),
            "GetStatus": grpc.unary_unary_rpc_method_handler(
                self.get_status, request_deserializer=api.GetStatusRequest.FromString,
                response_serializer=api.Status.SerializeToString),
            "GetPolicy": grpc.unary_unary_rpc_method_handler(
                self.get_policy, request_deserializer=api.GetPolicyRequest.FromString,
                response_serializer=api.PolicySet.SerializeToString),
        })


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"grpc.tls.{what}: cannot read {path}: {err.strerror}") from None


class ApiServer:
    """The gRPC server around AgentApi, started and stopped with the agent."""

    def __init__(self, listen: str, agent_api: AgentApi, tls: dict | None = None) -> None:
        if not tls and not is_local(listen):
            raise ConfigError(f"grpc.listen {listen}: plain text is allowed only on loopback or a "
                              "Unix socket; set grpc.tls.cert and grpc.tls.key")
        self.api = agent_api
        # one thread per stream, plus a few for unary calls; a stream over the limit is refused
        # with RESOURCE_EXHAUSTED rather than queued behind a stalled one
        workers = agent_api.max_streams + 4
        self._server = grpc.server(futures.ThreadPoolExecutor(workers, "hostagent-grpc"),
                                   maximum_concurrent_rpcs=workers,
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((agent_api.handler(),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.set_serving(False)
        if listen.startswith("unix:"):
            path = listen.removeprefix("unix://").removeprefix("unix:")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if os.path.exists(path):
                os.unlink(path)   # a previous agent's socket
        if tls:
            creds = grpc.ssl_server_credentials(
                [(_read(tls["key"], "key"), _read(tls["cert"], "cert"))],
                root_certificates=_read(tls["clientCA"], "clientCA") if tls.get("clientCA")
                else None,
                require_client_auth=bool(tls.get("clientCA")))
        try:
            port = (self._server.add_secure_port(listen, creds) if tls
                    else self._server.add_insecure_port(listen))
        except RuntimeError:  # newer grpcio raises where older ones returned 0
            port = 0
        if port == 0:
            raise ConfigError(f"grpc.listen {listen}: cannot listen there (in use?)")
        if listen.startswith("unix:"):
            self.address = listen
        else:
            self.address = f"{listen.rsplit(':', 1)[0]}:{port}"
        self._unix = path if listen.startswith("unix:") else None
        self.tls = bool(tls)

    def start(self) -> None:
        self._server.start()
        if self._unix:
            os.chmod(self._unix, 0o600)   # root only: the socket is plain text

    def set_serving(self, ok: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE):
            self.health.set(name, status)

    def stop(self, grace: float = 1.0) -> None:
        self.set_serving(False)
        self.api.bus.close()
        self._server.stop(grace).wait(grace + 1)
