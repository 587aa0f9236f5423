"""cadenza's library: connect to NATS JetStream (or start the embedded server), declare the
topology, publish and consume typed events.

Sessions, tracked activities and the worker runtime build on this module.
"""

from __future__ import annotations

from schemas import CancelCause as CancelCause
from schemas import CancelKind as CancelKind

from ._bus import Bus as Bus
from ._bus import BusState as BusState
from ._bus import BusStats as BusStats
from ._bus import Delivery as Delivery
from ._bus import PublishResult as PublishResult
from ._bus import connect as connect
from ._cancel import CancelRouter as CancelRouter
from ._cancel import request_cancel as request_cancel
from ._codec import MAX_EVENT_BYTES as MAX_EVENT_BYTES
from ._codec import decode as decode
from ._codec import encode as encode
from ._config import ConnectOptions as ConnectOptions
from ._config import Timeouts as Timeouts
from ._context import CancelToken as CancelToken
from ._context import Context as Context
from ._context import background as background
from ._exceptions import ActivityError as ActivityError
from ._exceptions import BusError as BusError
from ._exceptions import CadenzaError as CadenzaError
from ._exceptions import ConnectError as ConnectError
from ._exceptions import PublishError as PublishError
from ._exceptions import RemoteError as RemoteError
from ._exceptions import RequestError as RequestError
from ._exceptions import ServerStartError as ServerStartError
from ._exceptions import SessionError as SessionError
from ._exceptions import TopologyError as TopologyError
from ._exceptions import ValidationError as ValidationError
from ._heartbeat import Heartbeater as Heartbeater
from ._heartbeat import ProcessLoad as ProcessLoad
from ._heartbeat import new_worker_id as new_worker_id
from ._server import EmbeddedServer as EmbeddedServer
from ._server import find_server_binary as find_server_binary
from ._topology import BucketSpec as BucketSpec
from ._topology import ConsumerSpec as ConsumerSpec
from ._topology import StreamSpec as StreamSpec
from ._topology import Topology as Topology
from ._tracing import configure_tracing as configure_tracing

__all__ = (
    "MAX_EVENT_BYTES",
    "ActivityError",
    "BucketSpec",
    "Bus",
    "BusError",
    "BusState",
    "BusStats",
    "CadenzaError",
    "CancelCause",
    "CancelKind",
    "CancelRouter",
    "CancelToken",
    "ConnectError",
    "ConnectOptions",
    "ConsumerSpec",
    "Context",
    "Delivery",
    "EmbeddedServer",
    "Heartbeater",
    "ProcessLoad",
    "PublishError",
    "PublishResult",
    "RemoteError",
    "RequestError",
    "ServerStartError",
    "SessionError",
    "StreamSpec",
    "Timeouts",
    "Topology",
    "TopologyError",
    "ValidationError",
    "background",
    "configure_tracing",
    "connect",
    "decode",
    "encode",
    "find_server_binary",
    "new_worker_id",
    "request_cancel",
)
