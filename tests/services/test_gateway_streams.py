"""RequestStream: ordering, node filtering, a hand-off that moved to another decode node, a node down."""

from __future__ import annotations

from libs.protocol.messages import ErrorCode, TokenChunk
from services.gateway.streams import RequestStream, StreamRouter


def chunk(node: str, index: int, ids: list[int], finished: bool = False, handoff_to: str = "") -> TokenChunk:
    return TokenChunk(request_id="r", node_id=node, index=index, token_ids=ids, finished=finished,
                      finish_reason="length" if finished else None, handoff_to=handoff_to)


def drained(s: RequestStream) -> list[int]:
    out: list[int] = []
    while not s.queue.empty():
        out += s.queue.get_nowait().token_ids
    return out


def test_chunks_are_ordered_and_foreign_nodes_ignored() -> None:
    s = RequestStream("r", frozenset({"p", "d"}), 0)
    s.push(chunk("d", 1, [11, 12]))
    s.push(chunk("x", 0, [99]))  # not serving this attempt
    s.push(chunk("p", 0, [10]))
    s.push(chunk("d", 1, [11, 12]))  # a duplicate
    assert drained(s) == [10, 11, 12] and s.next_index == 3


def test_a_moved_hand_off_admits_the_new_decode_node() -> None:
    s = RequestStream("r", frozenset({"p", "d"}), 0)
    s.push(chunk("p", 0, [10]))
    s.push(chunk("e", 1, [11]))  # before the notice: e is nobody to this attempt
    s.push(chunk("x", 1, [], handoff_to="e"))  # a notice from a foreign node counts for nothing
    assert "e" not in s.node_ids and s.moved_to == ""
    s.push(chunk("p", 1, [], handoff_to="e"))
    assert s.node_ids == {"p", "d", "e"} and s.moved_to == "e"
    s.push(chunk("e", 1, [11, 12], finished=True))
    items = [s.queue.get_nowait() for _ in range(2)]
    assert [i.token_ids for i in items] == [[10], [11, 12]] and items[-1].finished


def test_a_node_down_names_that_node_whatever_the_phase() -> None:
    # The prefill node dies after its first token, mid-hand-off: the attempt now waits on
    # the decode node, but the failure is the prefill node's (the retry must exclude it).
    router = StreamRouter("gw")
    s = router.open("r", {"p", "d"}, 0)
    s.push(chunk("p", 0, [10]))
    assert router.fail_node("x", "node x is down") == 0
    assert router.fail_node("p", "node p is down") == 1
    items = [s.queue.get_nowait() for _ in range(2)]
    assert items[0].token_ids == [10]
    assert (items[1].error_code, items[1].node_id, items[1].error) == (ErrorCode.NODE_FAILED, "p", "node p is down")
