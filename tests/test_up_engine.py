"""``flowkv up --engine``: which engine the planned nodes run, and what is refused."""

from __future__ import annotations

import os

import pytest

from services.cli import up
from services.cli.plan import plan_cluster
from services.node.__main__ import parse


def _node_argv(engine: str) -> dict[str, list[str]]:
    cfg = up.UpConfig(model="smollm2", port=8123, engine=engine, nats_url="nats://127.0.0.1:4222")
    plan = plan_cluster(cfg, base_env={"PATH": os.environ["PATH"]})
    try:
        return {c.name: c.argv[3:] for c in plan.children if c.name.startswith(("prefill", "decode"))}
    finally:
        plan.cleanup()


def test_vllm_nodes_get_the_engine_and_a_block_size_vllm_cpu_takes():
    argv = _node_argv("vllm")
    assert sorted(argv) == ["decode-0", "prefill-0"]
    for node_id, args in argv.items():
        assert args[args.index("--engine") + 1] == "vllm"
        cfg, _ = parse(args)
        assert (cfg.node_id, cfg.engine, cfg.block_size, cfg.model) == (node_id, "vllm", 32, "smollm2")


def test_the_default_engine_is_flowkv_and_adds_no_flag():
    for args in _node_argv("flowkv").values():
        assert "--engine" not in args
        assert parse(args)[0].engine == "flowkv"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"engine": "sglang"}, "engine must be flowkv or vllm"),
    ({"engine": "vllm", "device": "cuda"}, "vllm engine on cpu only"),
])
def test_bad_engine_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        up.UpConfig(**overrides)


def test_vllm_nodes_get_their_own_cores():
    cfg = up.UpConfig(model="smollm2", port=8123, engine="vllm", nats_url="nats://127.0.0.1:4222")
    base = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")}
    plan = plan_cluster(cfg, base_env=base)
    try:
        binds = [c.env["VLLM_CPU_OMP_THREADS_BIND"] for c in plan.children if c.name.startswith(("prefill", "decode"))]
    finally:
        plan.cleanup()
    cores = sorted(os.sched_getaffinity(0))
    assert len(binds) == 2 and all(binds)
    used = [{int(c) for c in b.split(",")} for b in binds]
    assert all(u <= set(cores) for u in used)
    if len(cores) >= 2:
        assert not used[0] & used[1], binds  # no core bound by both engines


def test_vllm_core_lists_cover_the_cores_evenly():
    from services.cli.plan import vllm_core_lists

    n = len(os.sched_getaffinity(0))
    lists = vllm_core_lists(1)
    assert lists == [",".join(str(c) for c in sorted(os.sched_getaffinity(0)))]
    assert len(vllm_core_lists(n + 1)) == n + 1  # more nodes than cores: shared, none empty
    assert all(vllm_core_lists(n + 1))


def test_a_given_vllm_binding_is_left_alone():
    cfg = up.UpConfig(model="smollm2", port=8123, engine="vllm", nats_url="nats://127.0.0.1:4222")
    plan = plan_cluster(cfg, base_env={"PATH": os.environ["PATH"], "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    try:
        envs = [c.env for c in plan.children if c.name.startswith(("prefill", "decode"))]
    finally:
        plan.cleanup()
    assert all(e["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" for e in envs)
