"""The NATS connection every service opens: reconnects forever, authenticates, never logs secrets."""

from __future__ import annotations

import asyncio
import contextlib
import argparse
import dataclasses
import logging
import ssl
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client

from services.common import config as cfg

T = TypeVar("T")

log = logging.getLogger(__name__)

ENV_PREFIX = "FLOWKV_NATS"


@dataclass
class NatsConfig:
    """How to reach the broker. Shared by every service (flags ``--nats-*``, env ``FLOWKV_NATS_*``)."""

    url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL(s), comma-separated"})
    token: str = field(default="", metadata={"help": "NATS auth token", "secret": True})
    user: str = field(default="", metadata={"help": "NATS user"})
    password: str = field(default="", metadata={"help": "NATS password", "secret": True})
    tls_ca: str = field(default="", metadata={"help": "CA file to verify the server's TLS certificate"})
    tls_cert: str = field(default="", metadata={"help": "client TLS certificate (mutual TLS)"})
    tls_key: str = field(default="", metadata={"help": "client TLS key (mutual TLS)"})

    def __post_init__(self) -> None:
        if bool(self.user) != bool(self.password):
            raise ValueError("set both the NATS user and password, or neither")
        if self.token and self.user:
            raise ValueError("use either a NATS token or a user/password, not both")

    def redacted_url(self) -> str:
        return ",".join(redact(u) for u in self.servers())

    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def __repr__(self) -> str:  # never print secrets
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("token", "password"):
            if shown[name]:
                shown[name] = "***"
        shown["url"] = self.redacted_url()
        return f"NatsConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


_DEST = "nats_"


def add_nats_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--nats-<field>`` for every field of :class:`NatsConfig` (unset: env, then default).

    Every service and the CLI take the broker's settings this way, apart from their own.
    """
    group = parser.add_argument_group("NATS")
    for f in dataclasses.fields(NatsConfig):
        env = cfg.env_name(ENV_PREFIX, f.name)
        shown = "(secret)" if f.metadata.get("secret") else repr(f.default)
        group.add_argument(
            "--nats-" + f.name.replace("_", "-"),
            dest=_DEST + f.name,
            default=None,
            help=f"{f.metadata.get('help', '')} [env {env}; default {shown}]",
        )


def nats_config_from(args: argparse.Namespace) -> NatsConfig:
    """The :class:`NatsConfig` from ``--nats-*`` flags, then ``FLOWKV_NATS_*``, then defaults."""
    picked = argparse.Namespace(**{f.name: getattr(args, _DEST + f.name, None) for f in dataclasses.fields(NatsConfig)})
    return cfg.build(NatsConfig, ENV_PREFIX, picked)


def parse_service_args(
    cls: type[T], env_prefix: str, prog: str, description: str, argv: list[str] | None = None,
) -> tuple[T, NatsConfig]:
    """A service's config (``cls``, env ``<env_prefix>_*``) and its NATS settings, from
    flags, then environment variables, then defaults; bad values exit with a usage error."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    cfg.add_arguments(parser, cls, env_prefix)
    add_nats_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cfg.build(cls, env_prefix, args), nats_config_from(args)
    except ValueError as exc:
        parser.error(f"invalid configuration: {exc}")
        raise  # unreachable: parser.error exits


def redact(url: str) -> str:
    """Drop credentials embedded in a URL (``nats://user:pw@host`` -> ``nats://***@host``)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return url


class NatsAuthError(ConnectionError):
    """The broker refused our credentials on the first connect (a wrong token or password)."""


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


async def connect(config: NatsConfig, name: str) -> Client:
    """Connect (retrying until the server is there) and keep reconnecting forever after.

    Raises:
        NatsAuthError: the server answered but refused the credentials before the first
            connect succeeded (retrying would never help; the message names no secret).
    """
    auth_failed = asyncio.Event()
    connected = False

    async def on_error(exc: Exception) -> None:
        if _is_auth_error(exc) and not connected:
            auth_failed.set()
            return
        log.warning("nats error (%s): %s", name, exc)

    async def on_disconnected() -> None:
        log.warning("nats disconnected (%s)", name)

    async def on_reconnected() -> None:
        log.info("nats reconnected (%s)", name)

    options: dict = dict(
        servers=config.servers(),
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,  # also makes the first connect retry until the server is there
        reconnect_time_wait=0.25,
        connect_timeout=2,
        ping_interval=5,
        max_outstanding_pings=2,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    if config.token:
        options["token"] = config.token
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.tls_ca or config.tls_cert:
        ctx = ssl.create_default_context(cafile=config.tls_ca or None)
        if config.tls_cert:
            ctx.load_cert_chain(config.tls_cert, config.tls_key or None)
        options["tls"] = ctx
    attempt = asyncio.ensure_future(nats.connect(**options))
    refused = asyncio.ensure_future(auth_failed.wait())
    await asyncio.wait({attempt, refused}, return_when=asyncio.FIRST_COMPLETED)
    refused.cancel()
    if not attempt.done():  # credentials refused: stop the retry loop, say so once
        attempt.cancel()
        with contextlib.suppress(BaseException):
            await attempt
        raise NatsAuthError(
            f"NATS at {config.redacted_url()} refused the credentials of {name} (authorization violation): "
            "check FLOWKV_NATS_TOKEN / --nats-token (or user and password)"
        )
    nc = attempt.result()
    connected = True
    log.info("connected to nats %s as %s", config.redacted_url(), name)
    return nc
