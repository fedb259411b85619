"""Two node processes (``python -m services.node``) over a real nats-server: the KV moves
between processes through the ``shm`` transport, and SIGTERM ends a node cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import nats

from libs.protocol import messages
from libs.protocol.messages import LoadReport, NodeBye, Role, SamplingParams, SubmitRequest
from libs.protocol.subjects import NodeVerb, node, node_bye, node_load, stream

PROMPT = [(11 * i + 5) % 3000 + 20 for i in range(29)]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def spawn(node_id: str, role: Role, url: str) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FLOWKV_NODE_REPORT_INTERVAL_S="0.1", FLOWKV_NATS_URL=url)
    args = [sys.executable, "-m", "services.node", "--node-id", node_id, "--role", role.value, "--model", "tiny",
            "--device", "cpu", "--block-size", "4", "--num-blocks", "64", "--drain-timeout-s", "5"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def test_prefill_and_decode_processes_hand_off_through_shm(nats_server):
    procs = {"p0": spawn("p0", Role.PREFILL, nats_server.url), "d0": spawn("d0", Role.DECODE, nats_server.url)}
    try:
        nc = await nats.connect(nats_server.url)
        reports: dict[str, LoadReport] = {}
        byes: list[NodeBye] = []
        chunks: dict[str, list] = {"ref": [], "q1": []}
        done = {rid: asyncio.Event() for rid in chunks}

        async def on_report(msg) -> None:  # type: ignore[no-untyped-def]
            r = messages.decode(msg.data)
            reports[r.node_id] = r

        async def on_bye(msg) -> None:  # type: ignore[no-untyped-def]
            byes.append(messages.decode(msg.data))

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunk = messages.decode(msg.data)
            chunks[chunk.request_id].append(chunk)
            if chunk.finished:
                done[chunk.request_id].set()

        await nc.subscribe(node_load(), cb=on_report)
        await nc.subscribe(node_bye(), cb=on_bye)
        await nc.subscribe(stream("gw0"), cb=on_chunk)
        for _ in range(1500):  # both processes up (bounds a hung start only)
            if set(reports) == {"p0", "d0"}:
                break
            assert all(p.poll() is None for p in procs.values()), "a node process died"
            await asyncio.sleep(0.1)
        assert reports["p0"].role is Role.PREFILL and reports["d0"].role is Role.DECODE
        assert reports["p0"].host_id == reports["d0"].host_id and "shm" in reports["d0"].kv_transports

        async def run(rid: str, to: str) -> list:  # type: ignore[type-arg]
            req = SubmitRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=PARAMS, decode_node="d0",
                                reply_subject=stream("gw0"))
            ack = messages.decode((await nc.request(node(to, NodeVerb.SUBMIT), messages.encode(req), timeout=10)).data)
            assert ack.ok
            await asyncio.wait_for(done[rid].wait(), 120)
            return sorted(chunks[rid], key=lambda c: c.index)

        # The reference: d0's engine runs the request colocated (every role takes those).
        ref = await run("ref", "d0")
        expected = [t for c in ref for t in c.token_ids]
        assert len(expected) == PARAMS.max_tokens and {c.node_id for c in ref} == {"d0"}
        got = await run("q1", "p0")
        assert [t for c in got for t in c.token_ids] == expected
        assert got[0].node_id == "p0" and {c.node_id for c in got[1:]} == {"d0"}

        for name in ("p0", "d0"):
            procs[name].send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 60) for p in procs.values()]
        assert codes == [0, 0]
        await nc.flush()
        assert sorted(b.node_id for b in byes) == ["d0", "p0"]
        await nc.drain()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            out = p.stdout.read() if p.stdout else ""
            if "Traceback" in out:
                print(out)
