"""``/dashboard`` in headless Chromium (Debian's, driven by Playwright): the nodes and their
roles appear, a placement shows among the events; a screenshot goes to artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.observability.cluster import NUM_BLOCKS, http_get, prompt_of

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_cluster_json_lists_the_nodes_and_the_placements(cluster) -> None:  # type: ignore[no-untyped-def]
    cluster.complete(prompt_of(200), max_tokens=2, headers={"X-Request-Id": "dash-json"})
    state = json.loads(http_get(cluster.url + "/v1/cluster"))
    assert state["policy"] == "flowkv"
    nodes = {n["node_id"]: n for n in state["nodes"]}
    assert {k: (n["role"], n["state"], n["device"], n["total_blocks"]) for k, n in nodes.items()} == {
        "d0": ("decode", "ready", "cpu", NUM_BLOCKS), "p0": ("prefill", "ready", "cpu", NUM_BLOCKS)}
    for n in nodes.values():
        assert n["used_blocks"] == n["total_blocks"] - n["free_blocks"]
        assert "cached_prefix_hashes" not in n
    placed = [e for e in state["events"] if e["kind"] == "placement" and e["request_id"] == "dash-json"]
    assert [(e["prefill_node"], e["decode_node"]) for e in placed] == [("p0", "d0")]
    assert {e["node_id"] for e in state["events"] if e["kind"] == "node_up"} == {"p0", "d0"}


def test_dashboard_shows_nodes_and_roles_in_a_browser(cluster) -> None:  # type: ignore[no-untyped-def]
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
    assert Path(CHROMIUM).exists(), "no chromium: run scripts/setup.sh (apt-get install chromium)"
    cluster.complete(prompt_of(201), max_tokens=2, headers={"X-Request-Id": "dash-page"})
    out = ROOT / "artifacts" / "dashboard.png"
    out.parent.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(cluster.url + "/dashboard")
            page.wait_for_selector('.node[data-node-id="d0"]', timeout=15000)
            page.wait_for_selector('#events li[data-kind="placement"]', timeout=15000)
            cards = page.eval_on_selector_all(
                ".node", "els => els.map(e => [e.dataset.nodeId, e.dataset.role, e.dataset.state])")
            assert cards == [["d0", "decode", "ready"], ["p0", "prefill", "ready"]]
            assert page.inner_text('.node[data-node-id="p0"] .badge') == "prefill"
            assert page.inner_text("#policy") == "flowkv"
            assert f"/ {NUM_BLOCKS} (" in page.inner_text('.node[data-node-id="d0"] .kv-text')
            assert "dash-page: p0 → d0" in page.inner_text("#events")
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    assert out.stat().st_size > 10_000
