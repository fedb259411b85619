"""HTTP handlers for operators: /health, /ready, /metrics (Prometheus) and /openapi.json."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from libs.protocol.messages import NodeState
from services.common.messaging import ask_cluster
from services.gateway.openapi import openapi_document
from services.gateway.state import STATE


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.stopping:
        return web.json_response({"status": "stopping"}, status=503)
    try:
        reply = await ask_cluster(st.nc, st.config.cluster_timeout_s)
    except TypeError:
        return web.json_response({"status": "unavailable", "reason": "unexpected scheduler reply"}, status=503)
    except Exception as exc:  # timeout, no responders, closed connection: all mean "not ready"
        return web.json_response({"status": "unavailable", "reason": f"scheduler unreachable ({type(exc).__name__})"}, status=503)
    serving = [n.node_id for n in reply.nodes if n.state is NodeState.READY]
    status = 200 if serving else 503
    return web.json_response({"status": "ready" if serving else "no_nodes", "nodes": serving}, status=status)


async def prometheus(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(list(request.app[STATE].models)))
