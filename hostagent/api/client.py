"""Talking to an agent's gRPC endpoint: `hostagent events`, and the collector.

Addresses are what grpc.listen takes: HOST:PORT, [IPv6]:PORT, or unix:///path. TLS is used
when a CA is given (the agent's certificate must chain to it); a client certificate and key
are sent when given (agents with grpc.tls.clientCA require one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from hostagent.errors import HostAgentError
from hostagent.events.convert import KINDS, VERDICTS
from hostagent.v1 import agent_pb2 as api
from hostagent.v1 import events_pb2 as pb

SERVICE = "/hostagent.v1.AgentService/"
# an EventBatch of MAX_BATCH large events is well under this; gRPC's default is 4 MiB
MAX_MESSAGE = 64 * 1024 * 1024


class ClientError(HostAgentError):
    pass


@dataclass(frozen=True)
class Tls:
    ca: str | None = None           # PEM file: the CA the agent's certificate chains to
    cert: str | None = None         # PEM file: this client's certificate (mutual TLS)
    key: str | None = None
    server_name: str | None = None  # the name to check the agent's certificate for

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as err:
                raise ClientError(f"{path}: {err.strerror}") from None
        if bool(self.cert) != bool(self.key):
            raise ClientError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class AgentClient:
    def __init__(self, address: str, tls: Tls | None = None, options: Iterable = ()) -> None:
        self.address = address
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), *options]
        if tls is not None and tls.ca:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(address, tls.credentials(), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self._events = self.channel.unary_stream(
            SERVICE + "GetEvents", request_serializer=api.GetEventsRequest.SerializeToString,
            response_deserializer=pb.EventBatch.FromString)
        self._status = self.channel.unary_unary(
            SERVICE + "GetStatus", request_serializer=api.GetStatusRequest.SerializeToString,
            response_deserializer=api.Status.FromString)
        self._policy = self.channel.unary_unary(
            SERVICE + "GetPolicy", request_serializer=api.GetPolicyRequest.SerializeToString,
            response_deserializer=api.PolicySet.FromString)

    def events(self, since: int = 0, from_oldest: bool = False, kinds: Iterable[str] = (),
               verdicts: Iterable[str] = (), workloads: Iterable[str] = (),
               destinations: Iterable[str] = (), max_batch: int = 0,
               timeout: float | None = None):
        """The stream of EventBatch messages (a grpc call: .cancel() ends it)."""
        bad = [k for k in kinds if k not in KINDS] + [v for v in verdicts if v not in VERDICTS]
        if bad:
            raise ClientError(f"unknown kind or verdict: {', '.join(bad)} (kinds: "
                              f"{', '.join(KINDS)}; verdicts: {', '.join(VERDICTS)})")
        request = api.GetEventsRequest(
            since=since, from_oldest=from_oldest, kinds=[KINDS[k] for k in kinds],
            verdicts=[VERDICTS[v] for v in verdicts], workloads=list(workloads),
            destinations=list(destinations), max_batch=max_batch)
        return self._events(request, timeout=timeout)

    def iter_events(self, **kw) -> Iterator[pb.Event]:
        for batch in self.events(**kw):
            yield from batch.events

    def status(self, timeout: float = 5.0) -> api.Status:
        return self._status(api.GetStatusRequest(), timeout=timeout)

    def policy(self, timeout: float = 5.0) -> api.PolicySet:
        return self._policy(api.GetPolicyRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
