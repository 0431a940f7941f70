"""The Valkey/Redis Cluster client: redis-py's, with a failover confined to the failing node.

redis-py 5.x (arq 0.28 needs redis<6) answers trouble on one node with trouble on all:

- a connection error or timeout on one node closes every node's connections and
  re-reads the slot map, so in-flight commands on live nodes (a hub's blocking XREAD,
  a worker's pipelined XADDs) fail as well;
- each slot-map refresh replaces every ClusterNode (and its pool) by a new one and
  disconnects the old, tearing those commands down again;
- the keys of XREAD/XREADGROUP ("movablekeys" commands) are asked of one node with
  COMMAND GETKEYS; while that node is down no XREAD can be routed at all.

So while one master is down and not yet failed over, every generation paused. Here, a
failing node costs only its own commands: the error marks the node (its idle
connections are dropped) and schedules one shared, rate-limited slot-map refresh,
asked of the other nodes first; a refresh keeps the ClusterNode of every node still in
the map and disconnects only nodes that left it; and the keys of XREAD/XREADGROUP are
found here (EVAL/EVALSHA keys redis-py already reads locally). Closing the client
(``aclose``) still closes everything. Each override names the redis-py 5.3 code it replaces.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, NodesManager, RedisCluster
from redis.cluster import get_node_name
from redis.commands import READ_COMMANDS
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.utils import str_if_bytes

log = logging.getLogger("fanline.redis")

# A failing node asks for a slot-map refresh on every failed command; one refresh at
# most this often serves them all (each is one CLUSTER SLOTS to a live node).
REFRESH_EVERY_S = 0.5

_XREAD_OPTIONS = {"COUNT": 1, "BLOCK": 1, "NOACK": 0}  # option -> how many values follow it


def stream_keys(command: str, args: tuple[Any, ...]) -> list[Any]:
    """The keys of ``XREAD``/``XREADGROUP`` args (after the command name): those after STREAMS, first half."""
    i = 3 if command.upper() == "XREADGROUP" else 0  # GROUP group consumer
    while i < len(args) and str_if_bytes(args[i]).upper() in _XREAD_OPTIONS:
        i += 1 + _XREAD_OPTIONS[str_if_bytes(args[i]).upper()]
    if i >= len(args) or str_if_bytes(args[i]).upper() != "STREAMS" or (len(args) - i - 1) % 2:
        raise RedisClusterException(f"Invalid args in command: {command, *args}")
    rest = args[i + 1 :]
    return list(rest[: len(rest) // 2])


def _connected(node: ClusterNode) -> bool:
    return any(connection.is_connected for connection in node._connections)


class _NodesManager(NodesManager):
    __slots__ = ()

    def set_nodes(self, old: dict[str, ClusterNode], new: dict[str, ClusterNode], remove_old: bool = False) -> None:
        # Replaces: a new ClusterNode for every node of a fresh slot map, the known one
        # disconnected, its in-flight commands failing. Keep the known node (and its pool),
        # take its new role; only nodes that left the map are disconnected (remove_old).
        for name, node in new.items():
            known = self.nodes_cache.get(name)
            if known is not None and known is not node:
                known.server_type = node.server_type
                new[name] = known
        super().set_nodes(old, new, remove_old)

    async def initialize(self) -> None:
        # Ask the nodes we hold a live connection to first: a dead node (its connections
        # closed by their errors) answers last, if it still is a startup node at all.
        self.startup_nodes = dict(sorted(self.startup_nodes.items(), key=lambda item: not _connected(item[1])))
        await super().initialize()
        # The slot map it built lists the new objects set_nodes dropped: point it at the
        # kept ones (no await since it was set, so no command saw it). A range of slots
        # shares one list, which MOVED handling updates in place: keep the sharing.
        kept: dict[int, list[ClusterNode]] = {}
        for slot, nodes in self.slots_cache.items():
            if id(nodes) not in kept:
                kept[id(nodes)] = [self.nodes_cache.get(node.name, node) for node in nodes]
            self.slots_cache[slot] = kept[id(nodes)]


class ValkeyCluster(RedisCluster):
    """``RedisCluster`` whose failover touches only the failing node's commands (see module docstring)."""

    __slots__ = ("_refresh", "_refreshed_at")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.nodes_manager
        self.nodes_manager = _NodesManager(
            list(old.startup_nodes.values()),
            old.require_full_coverage,
            old.connection_kwargs,
            address_remap=old.address_remap,
            event_dispatcher=old._event_dispatcher,
        )
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
            self._refresh = None
        await super().aclose()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint or transaction:  # as redis-py
            raise RedisClusterException("transaction and shard_hint are deprecated in cluster mode")
        return _Pipeline(self)  # type: ignore[abstract]  # as redis-py's ClusterPipeline(self)

    def refresh_soon(self) -> None:
        """Re-read the slot map soon: one refresh in flight at a time, at most every REFRESH_EVERY_S."""
        if self._initialize or (self._refresh is not None and not self._refresh.done()):
            return  # not started (or closed): the next command initialises
        self._refresh = asyncio.create_task(self._refresh_slots(), name="cluster-slots-refresh")

    async def _refresh_slots(self) -> None:
        await asyncio.sleep(max(0.0, self._refreshed_at + REFRESH_EVERY_S - time.monotonic()))
        try:
            await self.nodes_manager.initialize()
        except (RedisError, RedisClusterException) as exc:  # the next failure asks again
            log.warning("refreshing the cluster's slot map: %s", exc)
        finally:
            self._refreshed_at = time.monotonic()

    async def _node_failed(self, node: ClusterNode) -> None:
        """A connection error or timeout on ``node``: drop its idle connections, route around it."""
        # Replaces: aclose() of every node. The failed connection closed itself; idle ones
        # to a dead node would each fail one more command. In-use ones end by themselves.
        # Taken out of the free list while they close (no other command may pick one up
        # half closed), then put back: they reconnect when next used.
        idle = list(node._free)
        node._free.clear()
        try:
            for connection in idle:
                await connection.disconnect(nowait=True)
        finally:
            node._free.extend(idle)
        # Asked of the other nodes first (redis-py's own step), then refreshed in the background.
        self.nodes_manager.startup_nodes.pop(node.name, None)
        if node is self.get_default_node():
            self.replace_default_node()  # keyless commands (PING…) go elsewhere meanwhile
        self.refresh_soon()

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # Replaces: COMMAND GETKEYS asked of one node (the parser's) for XREAD/XREADGROUP,
        # which fails for every XREAD while that node is down.
        if command.upper() in ("XREAD", "XREADGROUP"):
            slots = {self.keyslot(key) for key in stream_keys(command, args)}
            if len(slots) != 1:
                raise RedisClusterException(f"{command} - all keys must map to the same key slot")
            return slots.pop()
        return await super()._determine_slot(command, *args)

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        # redis-py 5.3's loop, with _node_failed / refresh_soon in place of its three
        # aclose() calls (every node closed, the slot map re-read before the next command).
        asking = moved = False
        redirect_addr = None
        ttl = self.RedisClusterRequestTTL
        while ttl > 0:
            ttl -= 1
            try:
                if asking:
                    redirected = self.get_node(node_name=redirect_addr)
                    if redirected is None:  # (redis-py fails on None.execute_command)
                        raise ClusterError(f"ASK to a node not in the slot map: {redirect_addr}")
                    target_node = redirected
                    await target_node.execute_command("ASKING")
                    asking = False
                elif moved:
                    slot = await self._determine_slot(*args)
                    reading = args[0] in READ_COMMANDS
                    target_node = self.nodes_manager.get_node_from_slot(
                        slot, self.read_from_replicas and reading, self.load_balancing_strategy if reading else None
                    )
                    moved = False
                return await target_node.execute_command(*args, **kwargs)
            except (BusyLoadingError, MaxConnectionsError):
                raise
            except (ConnectionError, RedisTimeoutError):
                await self._node_failed(target_node)
                raise
            except (ClusterDownError, SlotNotCoveredError):
                self.refresh_soon()
                await asyncio.sleep(0.25)
                raise
            except MovedError as e:
                # redis-py patches the slot from the redirect, and every reinitialize_steps
                # MOVED re-reads the whole map (the refresh, here).
                self.reinitialize_counter += 1
                if self.reinitialize_steps and self.reinitialize_counter % self.reinitialize_steps == 0:
                    self.refresh_soon()
                    self.reinitialize_counter = 0
                self.nodes_manager._moved_exception = e
                moved = True
            except AskError as e:
                redirect_addr = get_node_name(host=e.host, port=e.port)
                asking = True
            except TryAgainError:
                if ttl < self.RedisClusterRequestTTL / 2:
                    await asyncio.sleep(0.05)
        raise ClusterError("TTL exhausted.")


class _Pipeline(ClusterPipeline):
    __slots__ = ()

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        # redis-py 5.3's retry loop, with the failing node marked (or a refresh asked) in
        # place of aclose() of the whole client after each retryable error.
        if not self._command_stack:
            return []
        client = self._client
        assert isinstance(client, ValkeyCluster)
        exception: BaseException | None = None
        try:
            for _ in range(client.cluster_error_retry_attempts):
                if client._initialize:
                    await client.initialize()
                try:
                    return await self._execute(
                        client,
                        self._command_stack,
                        raise_on_error=raise_on_error,
                        allow_redirections=allow_redirections,
                    )
                except BaseException as e:
                    if type(e) not in self.ERRORS_ALLOW_RETRY:
                        raise
                    # The failing node is not known here (the error comes from one of the
                    # nodes' pipelines); its connection closed itself, and the refresh asks
                    # the nodes with live connections first.
                    exception = e
                    client.refresh_soon()
                    await asyncio.sleep(0.25)
            assert exception is not None
            raise exception
        finally:
            self._command_stack = []
