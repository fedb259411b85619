"""What the handlers share: the gateway's state, reachable from ``request.app[STATE]``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from nats.aio.client import Client

from services.gateway.admission import Admission
from services.gateway.config import GatewayConfig
from services.gateway.dispatch import Dispatcher
from services.gateway.events import EventLog
from services.gateway.schemas import check_model
from services.gateway.streams import StreamRouter
from services.gateway.tokenizer import ModelTokenizer, ServedModel


@dataclass
class GatewayState:
    config: GatewayConfig
    models: dict[str, ServedModel]  # by served name, in the configured order (at least one)
    admission: Admission
    router: StreamRouter
    nc: Client | None = None
    dispatcher: Dispatcher | None = None
    owns_nc: bool = False  # the app opened the connection (and drains it on cleanup)
    stopping: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    open_streams: set[Any] = field(default_factory=set)
    events: EventLog = field(default_factory=EventLog)  # scheduler events, for /v1/cluster

    @property
    def tokenizer(self) -> ModelTokenizer:
        """The first model's tokenizer (the only one of a single-model gateway)."""
        return next(iter(self.models.values())).tokenizer

    def served(self, name: str | None) -> ServedModel:
        """The model a request names (None: the first one); an unknown name is a 404."""
        if name is None:
            return next(iter(self.models.values()))
        check_model(name, self.models.keys())
        return self.models[name]


STATE: web.AppKey[GatewayState] = web.AppKey("flowkv_gateway_state", GatewayState)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("flowkv_request_id", str)
