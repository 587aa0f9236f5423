"""The transport: one connection to NATS JetStream and what is built directly on it.

The connection and its facade (:class:`Bus`), the embedded server and child processes, the topology
(streams, consumers, buckets), the codec, retry with backoff, tracing and telemetry, followers of a
stream or bucket, typed key-value buckets (:class:`Bucket`), and the service-info requests. Nothing
here knows sessions or tracked activities; the only place in cadenza that imports nats-py. Imports point one way
(tests/test_layers.py)::

    bus.sessions -> bus.tracking -> bus._cancel, bus._heartbeat -> bus.transport
        -> bus._config, bus._context, bus._exceptions (the shared base)
"""

from __future__ import annotations

import typing as _typing

from schemas._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from ._bucket import Bucket as Bucket
    from ._bucket import Entry as Entry
    from ._bucket import RawBucket as RawBucket
    from ._bucket import Stored as Stored
    from ._bucket import StoredEvent as StoredEvent
    from ._bucket import last_event as last_event
    from ._bus import Bus as Bus
    from ._bus import BusState as BusState
    from ._bus import connect as connect
    from ._codec import MAX_EVENT_BYTES as MAX_EVENT_BYTES
    from ._codec import decode as decode
    from ._codec import encode as encode
    from ._consume import Delivery as Delivery
    from ._errors import ENGINE_ERRORS as ENGINE_ERRORS
    from ._errors import engine_errors as engine_errors
    from ._follow import WORKER_EVENTS as WORKER_EVENTS
    from ._follow import follow_bucket as follow_bucket
    from ._follow import follow_stream as follow_stream
    from ._follow import follow_worker_events as follow_worker_events
    from ._follow import last_stored_seq as last_stored_seq
    from ._link import LinkStatus as LinkStatus
    from ._link import is_closed as is_closed
    from ._link import keep_reconnecting as keep_reconnecting
    from ._link import link_status as link_status
    from ._link import nobody_subscribed as nobody_subscribed
    from ._link import server_info as server_info
    from ._process import ChildProcess as ChildProcess
    from ._publish import PublishResult as PublishResult
    from ._retry import backoff_delay as backoff_delay
    from ._retry import is_transient as is_transient
    from ._retry import retry_transient as retry_transient
    from ._retry import run_restarting as run_restarting
    from ._server import EmbeddedCluster as EmbeddedCluster
    from ._server import EmbeddedServer as EmbeddedServer
    from ._server import die_with_parent as die_with_parent
    from ._server import find_server_binary as find_server_binary
    from ._service_info import gather_service_info as gather_service_info
    from ._service_info import package_version as package_version
    from ._service_info import serve_service_info as serve_service_info
    from ._stats import BusStats as BusStats
    from ._streams import AccountUsage as AccountUsage
    from ._streams import Received as Received
    from ._streams import StreamPeer as StreamPeer
    from ._streams import StreamReader as StreamReader
    from ._streams import StreamStatus as StreamStatus
    from ._streams import account_usage as account_usage
    from ._streams import delete_consumer as delete_consumer
    from ._streams import ensure_topology as ensure_topology
    from ._streams import follow_events as follow_events
    from ._streams import open_reader as open_reader
    from ._streams import purge_below as purge_below
    from ._streams import purge_subject as purge_subject
    from ._streams import stored_events as stored_events
    from ._streams import stream_status as stream_status
    from ._subscriptions import core_messages as core_messages
    from ._subscriptions import flush as flush
    from ._subscriptions import new_inbox as new_inbox
    from ._subscriptions import subscribe_callback as subscribe_callback
    from ._telemetry import Telemetry as Telemetry
    from ._telemetry import configure_telemetry as configure_telemetry
    from ._topology import BUCKETS as BUCKETS
    from ._topology import STREAMS as STREAMS
    from ._topology import BucketSpec as BucketSpec
    from ._topology import ConsumerSpec as ConsumerSpec
    from ._topology import StreamSpec as StreamSpec
    from ._topology import Topology as Topology
    from ._topology import format_size as format_size
    from ._topology import parse_size as parse_size
    from ._tracing import configure_tracing as configure_tracing

__getattr__, __dir__ = _lazy_exports(__name__)

# No __all__ here: the block above is the list (schemas/_lazy.py gives it as __all__).
