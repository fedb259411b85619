"""NATS flags for the CLI's own subcommands: ``--nats-url`` ... with env ``FLOWKV_NATS_*``."""

from __future__ import annotations

import argparse
import dataclasses

from services.common import config
from services.common.nats import ENV_PREFIX, NatsConfig

_DEST = "nats_"


def add_nats_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--nats-<field>`` for every field of :class:`NatsConfig` (unset: env, then default)."""
    group = parser.add_argument_group("NATS")
    for f in dataclasses.fields(NatsConfig):
        env = config.env_name(ENV_PREFIX, f.name)
        shown = "(secret)" if f.metadata.get("secret") else repr(f.default)
        group.add_argument(
            "--nats-" + f.name.replace("_", "-"),
            dest=_DEST + f.name,
            default=None,
            help=f"{f.metadata.get('help', '')} [env {env}; default {shown}]",
        )


def build_nats(args: argparse.Namespace) -> NatsConfig:
    """The :class:`NatsConfig` from ``--nats-*`` flags, then ``FLOWKV_NATS_*``, then defaults."""
    picked = argparse.Namespace(**{f.name: getattr(args, _DEST + f.name, None) for f in dataclasses.fields(NatsConfig)})
    return config.build(NatsConfig, ENV_PREFIX, picked)
