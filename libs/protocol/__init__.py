"""FlowKV's NATS protocol: subjects (:mod:`.subjects`) and messages (:mod:`.messages`)."""

from libs.protocol import subjects
from libs.protocol.messages import *  # noqa: F401,F403  (the module is a list of wire types)
from libs.protocol.messages import decode, encode

__all__ = ["subjects", "encode", "decode"]
