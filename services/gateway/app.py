"""The gateway's aiohttp application: routes, middlewares (request id, auth, errors), life cycle.

Start-up connects to NATS (unless given a connection), subscribes the token stream and
the scheduler's events. Clean-up refuses new requests, lets open streams finish (bounded
by the runner's shutdown timeout), then unsubscribes and drains the connection.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Mapping

from aiohttp import web
from nats.aio.client import Client

from services.common.logs import request_id_var
from services.common.nats import NatsConfig, connect
from services.gateway import cluster, metrics, openai_routes, ops_routes, tokenize_routes
from services.gateway.admission import Admission
from services.gateway.config import GatewayConfig
from services.gateway.dispatch import Dispatcher
from services.gateway.errors import ApiError
from services.gateway.state import REQUEST_ID, STATE, GatewayState
from services.gateway.streams import StreamRouter
from services.gateway.tokenizer import ModelTokenizer, ServedModel, load_model_tokenizer

log = logging.getLogger(__name__)

# Subject-safe and short enough for the "-rN" suffix of retried attempts.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
# /dashboard is a static page without data; the /v1/cluster JSON it polls needs the key.
_OPEN_PATHS = {"/health", "/ready", "/metrics", "/openapi.json", "/dashboard"}


def new_request_id() -> str:
    return f"cmpl-{secrets.token_hex(12)}"


@web.middleware
async def _request_id_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else new_request_id()
    request[REQUEST_ID] = request_id
    token = request_id_var.set(request_id)
    try:
        resp = await handler(request)
        if not resp.prepared:
            resp.headers["X-Request-Id"] = request_id
        return resp
    finally:
        request_id_var.reset(token)


def _endpoint_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "other"


@web.middleware
async def _error_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = exc.response()
    except web.HTTPException as exc:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "http_error")
        resp = ApiError(exc.status, exc.reason, code=code).response()
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        resp = ApiError(500, "internal error", type="server_error", code="internal_error").response()
    metrics.REQUESTS.labels(_endpoint_label(request), str(resp.status)).inc()
    return resp


@web.middleware
async def _auth_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    keys = request.app[STATE].config.api_keys
    if keys and request.path not in _OPEN_PATHS:
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        given_b = given.strip().encode()
        # Compare with every key (constant time each) so timing says nothing about which matched.
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(given_b, k.encode())
        if not ok:
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
    return await handler(request)


def create_app(
    config: GatewayConfig,
    nats_config: NatsConfig | None = None,
    nc: Client | None = None,
    tokenizer: ModelTokenizer | Mapping[str, ModelTokenizer] | None = None,
) -> web.Application:
    """Build the gateway application.

    Args:
        config: the gateway's configuration.
        nats_config: how to reach NATS when ``nc`` is not given (connected on start-up).
        nc: an open NATS connection to use (not drained on clean-up).
        tokenizer: preloaded tokenizers: one (for the first model of ``config.model``), or one
            per model name of ``config.model``; the others are loaded.

    Returns:
        The application; run it with :func:`make_runner` (or ``web.run_app``).
    """
    models = _served_models(config, tokenizer)
    app = web.Application(
        middlewares=[_request_id_middleware, _error_middleware, _auth_middleware], client_max_size=config.max_body_bytes
    )
    st = GatewayState(
        config=config, models=models, router=StreamRouter(config.gateway_id), nc=nc,
        admission=Admission(config.max_concurrent_requests, config.max_queued_tokens, config.retry_after_s),
    )
    app[STATE] = st
    app.router.add_get("/v1/models", openai_routes.models)
    app.router.add_post("/v1/completions", openai_routes.completions)
    app.router.add_post("/v1/chat/completions", openai_routes.chat_completions)
    app.router.add_post("/tokenize", tokenize_routes.tokenize)
    app.router.add_post("/detokenize", tokenize_routes.detokenize)
    app.router.add_get("/health", ops_routes.health)
    app.router.add_get("/ready", ops_routes.ready)
    app.router.add_get("/metrics", ops_routes.prometheus)
    app.router.add_get("/openapi.json", ops_routes.openapi)
    app.router.add_get("/v1/cluster", cluster.cluster_state)
    app.router.add_get("/dashboard", cluster.dashboard_page)

    async def on_startup(app: web.Application) -> None:
        if st.nc is None:
            st.nc = await connect(nats_config or NatsConfig(), f"gateway-{config.gateway_id}")
            st.owns_nc = True
        await st.router.start(st.nc)
        await st.events.start(st.nc)
        st.dispatcher = Dispatcher(st.nc, st.router, config, st.events)
        await st.dispatcher.start()
        log.info("gateway %s serving %s", config.gateway_id,
                 ", ".join(f"model {m.name}" + (f" (nodes' --model {m.model})" if m.model != m.name else "")
                           for m in models.values()))

    async def on_shutdown(app: web.Application) -> None:
        st.stopping = True  # /ready turns 503 and new generations are refused

    async def on_cleanup(app: web.Application) -> None:
        if st.dispatcher is not None:
            await st.dispatcher.stop()
        await st.router.stop()
        await st.events.stop()
        if st.owns_nc and st.nc is not None:
            await st.nc.drain()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _served_models(config: GatewayConfig,
                   preloaded: ModelTokenizer | Mapping[str, ModelTokenizer] | None) -> dict[str, ServedModel]:
    """Every served model by its served name, its tokenizer capped at ``config.max_model_len``."""
    served = config.served_models
    if isinstance(preloaded, ModelTokenizer):
        preloaded = {served[0][1]: preloaded}
    out: dict[str, ServedModel] = {}
    for name, model in served:
        mt = (preloaded or {}).get(model) or load_model_tokenizer(model)
        if config.max_model_len:
            mt = ModelTokenizer(mt.tokenizer, min(config.max_model_len, mt.max_model_len))
        out[name] = ServedModel(name, model, mt)
    return out


def make_runner(app: web.Application) -> web.AppRunner:
    """A runner that cancels a handler when its client disconnects (so the request is
    cancelled on the nodes) and gives open streams ``shutdown_timeout_s`` on shutdown."""
    config = app[STATE].config
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=config.shutdown_timeout_s, access_log=None)
