"""FlowKV's hand-off as a vLLM v1 KV connector (``KVConnectorBase_V1``).

vLLM loads this module by path (``kv_connector_module_path``) in its engine-core process.
The connector moves no bytes itself: the node's :class:`libs.kvtransfer.agent.KVAgent`
does, with FlowKV's transports, straight between the two engines' KV caches. What the
connector does is make vLLM's cache reachable and let the node's control plane decide
when blocks are held, reserved, filled and given back:

- **Where the KV lives.** :meth:`FlowKVConnector.get_mem_pool_context` catches vLLM's one
  KV-cache allocation (one buffer for every layer, layer-major): on the CPU it goes into
  named POSIX shared memory, on CUDA it is exported through a CUDA IPC handle
  (:mod:`libs.vllm_engine.kv_export`). The node maps the same memory as a layer-major
  :class:`libs.kvtransfer.pool.KVPool` (:meth:`FlowKVWorkerExtension.flowkv_pool_info`
  says where and what).
- **P holds.** A request sent with ``kv_transfer_params={"flowkv_hold": True}`` and
  ``max_tokens=1`` keeps its blocks when it finishes by length (``request_finished``
  returns ``True``); its block ids come back in the output's ``kv_transfer_params``. The
  node's ``flowkv_release`` ends the hold: the worker reports the request as finished
  sending and vLLM frees the blocks.
- **D reserves.** A request (prompt + P's first token) sent with
  ``{"flowkv_remote": True, "num_prompt_tokens": n}`` matches the prompt's uncached
  tokens as an asynchronous external load: vLLM allocates its blocks and parks it in
  ``WAITING_FOR_REMOTE_KVS``. The connector tells the node the block ids (a datagram on
  the node's socket, ``kv_connector_extra_config["events_socket"]``); P writes into them;
  the node's ``flowkv_landed`` reports the load finished and vLLM computes the first
  token's position and decodes on. ``flowkv_landed`` after an abort frees the blocks.

Reports to vLLM happen only for requests the worker knows are held or reserved (from the
scheduler side's metadata), each once, so a late or repeated command cannot touch a
request vLLM has already freed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.engine import FinishReason

from libs.vllm_engine.kv_export import KVCacheExport

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
HOLD = "flowkv_hold"
REMOTE = "flowkv_remote"
BLOCK_IDS = "flowkv_block_ids"
# The node's request id. vLLM gives each request an internal id of its own (the node's
# plus a random suffix); events to the node and commands from it use the node's.
NODE_ID = "flowkv_id"


class Allocation(msgspec.Struct, frozen=True):
    """Engine core -> node: vLLM reserved ``block_ids`` for a remote request's prompt."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int


@dataclass
class FlowKVMetadata(KVConnectorMetadata):
    """Scheduler side -> worker side, every step: requests newly held (P) or reserved (D)."""

    held: dict[str, str] = field(default_factory=dict)  # node's id -> vLLM's id
    reserved: dict[str, str] = field(default_factory=dict)


_STOP_GRACE_S = 10.0


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (vLLM's workers of an engine core)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _stop_with_node(node_pid: int) -> None:
    """In vLLM's engine-core process: stop it once the node that started it is gone.

    A SIGKILLed node cannot stop vLLM; its engine core and workers would go on holding
    the model, the KV cache and the CPU (seen: a worker busy at 87% of a core for half an
    hour after its node was killed mid-hand-off). SIGTERM is vLLM's own shutdown, which
    stops the workers too; if the process is still there ``_STOP_GRACE_S`` later, its
    workers and then itself are SIGKILLed.
    """
    while os.getppid() == node_pid:
        time.sleep(1.0)
    log.warning("the node (pid %d) is gone: stopping its vLLM engine", node_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_STOP_GRACE_S)
    log.warning("vLLM's engine did not stop on SIGTERM: killing it and its workers")
    for child in _children(os.getpid()):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _node_id(request: Request) -> str:
    return str((request.kv_transfer_params or {}).get(NODE_ID, request.request_id))


class FlowKVConnector(KVConnectorBase_V1):
    """See the module docstring. One instance per role (scheduler, worker) per engine."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._events_path: str = str(extra.get("events_socket", ""))
        node_pid = int(extra.get("node_pid", 0))
        if role == KVConnectorRole.SCHEDULER and node_pid:
            threading.Thread(target=_stop_with_node, args=(node_pid,), name="flowkv-node-watch", daemon=True).start()
        self._events: socket.socket | None = None
        self._local_hits: dict[str, int] = {}  # request -> locally cached tokens at its last match
        self._reserved: set[str] = set()  # requests whose reservation the node has been told of
        self._new_held: dict[str, str] = {}
        self._new_reserved: dict[str, str] = {}
        # worker side
        self.kv_export = KVCacheExport()
        self.pool_info: dict[str, Any] = {}
        self._held: dict[str, str] = {}  # node's id -> vLLM's id, until released
        self._awaiting: dict[str, str] = {}  # the same, until landed
        self._release_asked: set[str] = set()
        self._landed_asked: set[str] = set()

    # ====================================================== scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not params.get(REMOTE) or request.request_id in self._reserved:
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        missing = int(params["num_prompt_tokens"]) - num_computed_tokens
        return (missing, True) if missing > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if not params.get(REMOTE) or request.request_id in self._reserved:
            return
        rid = request.request_id
        self._reserved.add(rid)
        assert self._kv_cache_manager is not None
        prompt_blocks = -(-int(params["num_prompt_tokens"]) // self.block_size)
        block_ids = list(self._kv_cache_manager.get_block_ids(rid)[0][:prompt_blocks])
        if num_external_tokens > 0:
            self._new_reserved[_node_id(request)] = rid
        self._notify(Allocation(_node_id(request), block_ids, self._local_hits.pop(rid, 0)))

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = FlowKVMetadata(held=self._new_held, reserved=self._new_reserved)
        self._new_held, self._new_reserved = {}, {}
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._reserved.discard(rid)
        self._local_hits.pop(rid, None)
        params = request.kv_transfer_params or {}
        if not params.get(HOLD) or request.get_finished_reason() != FinishReason.LENGTH or not block_ids:
            return False, None
        self._new_held[_node_id(request)] = rid
        return True, {BLOCK_IDS: list(block_ids)}

    def _notify(self, event: Allocation) -> None:
        if not self._events_path:
            return
        if self._events is None:
            self._events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._events.sendto(msgspec.msgpack.encode(event), self._events_path)
        except OSError as exc:  # the node is gone: its reservation ends with its process
            log.warning("cannot tell the node of %s's blocks: %s", event.request_id, exc)

    # ========================================================= worker side

    def get_mem_pool_context(self) -> Any:
        return self.kv_export.allocation() if self._role == KVConnectorRole.WORKER else None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check that vLLM laid the cache out as one layer-major buffer; note how the node maps it."""
        self.pool_info = self.kv_export.describe(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, FlowKVMetadata):
            self._held.update(connector_metadata.held)
            self._awaiting.update(connector_metadata.reserved)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Nothing to load: P's agent has written the blocks before the node reports them."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are complete before a request leaves WAITING_FOR_REMOTE_KVS."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing to save: held blocks are read in place by the node's agent."""

    def wait_for_save(self) -> None:
        """Nothing in flight inside vLLM."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # A command may come before the metadata that names its request: it waits here.
        released = self._release_asked & self._held.keys()
        landed = self._landed_asked & self._awaiting.keys()
        self._release_asked -= released
        self._landed_asked -= landed
        sent = {self._held.pop(n) for n in released}
        received = {self._awaiting.pop(n) for n in landed}
        return (sent or None), (received or None)

    def release(self, request_id: str) -> None:
        """The node is done with a held prefill's blocks."""
        self._release_asked.add(request_id)

    def landed(self, request_id: str) -> None:
        """A reservation's bytes are in (or it is being dropped after an abort)."""
        self._landed_asked.add(request_id)

    def shutdown(self) -> None:
        self.kv_export.close()


class FlowKVWorkerExtension:
    """Methods the node calls in vLLM's worker (``AsyncLLM.collective_rpc``); vLLM mixes
    this class into its worker (``worker_extension_cls``)."""

    def _flowkv(self) -> FlowKVConnector:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        if not isinstance(connector, FlowKVConnector):
            raise RuntimeError("the FlowKV connector is not this engine's KV connector")
        return connector

    def flowkv_pool_info(self) -> dict[str, Any]:
        return dict(self._flowkv().pool_info)

    def flowkv_release(self, request_id: str) -> None:
        self._flowkv().release(request_id)

    def flowkv_landed(self, request_id: str) -> None:
        self._flowkv().landed(request_id)
