"""The session rules without sockets: request ids, chunk accounting, keep-alive and cancel."""

import pytest

from meshd.wire.frames import ProtocolError
from meshd.wire.session import Action, ClientRules, ServerRules


def test_requests_start_and_their_announced_chunks_are_taken_and_no_more():
    rules = ServerRules()
    assert rules.receive({"op": "forward", "id": 1, "chunks": 2}) == Action("start", 1)
    assert rules.receive({"op": "chunk", "id": 1, "index": 0}) == Action("chunk", 1)
    assert rules.receive({"op": "chunk", "id": 1, "index": 1}) == Action("chunk", 1)
    with pytest.raises(ProtocolError, match="request 1 .forward. announced 2 chunk frames; more arrived"):
        rules.receive({"op": "chunk", "id": 1, "index": 2})


@pytest.mark.parametrize("chunks", [True, -1, 10**9, "3", None])
def test_a_bad_chunk_count_announces_none(chunks):
    rules = ServerRules()
    rules.receive({"op": "forward", "id": 1, "chunks": chunks})
    with pytest.raises(ProtocolError, match="announced 0 chunk frames"):
        rules.receive({"op": "chunk", "id": 1})


def test_chunks_of_an_ended_request_are_dropped_but_never_sent_ones_break_the_rules():
    rules = ServerRules()
    rules.receive({"op": "forward", "id": 5, "chunks": 3})
    rules.finished(5)
    assert rules.receive({"op": "chunk", "id": 5}) == Action("ignore", 5)
    with pytest.raises(ProtocolError, match="chunk frame for request 6, which was never sent"):
        rules.receive({"op": "chunk", "id": 6})


def test_ids_must_be_integers_and_not_reused_while_running():
    rules = ServerRules()
    for bad in ("1", 1.0, True, None):
        with pytest.raises(ProtocolError, match="has no integer id"):
            rules.receive({"op": "echo", "id": bad})
    rules.receive({"op": "echo", "id": 1})
    with pytest.raises(ProtocolError, match="request id 1 is already in use"):
        rules.receive({"op": "echo", "id": 1})
    rules.finished(1)
    assert rules.receive({"op": "echo", "id": 1}).kind == "start"


def test_beyond_the_cap_requests_are_busy_and_their_chunks_dropped():
    rules = ServerRules(max_requests=2)
    rules.receive({"op": "a", "id": 1})
    rules.receive({"op": "b", "id": 2})
    busy = rules.receive({"op": "forward", "id": 3, "chunks": 1})
    assert busy.kind == "busy" and "2 requests already run" in busy.message
    assert rules.receive({"op": "chunk", "id": 3}) == Action("ignore", 3)


def test_ping_cancel_and_pong():
    rules = ServerRules()
    assert rules.receive({"op": "ping", "id": 0}) == Action("pong", 0)
    assert rules.receive({"op": "pong", "id": 0}) == Action("ignore", 0)
    assert rules.receive({"op": "cancel", "id": 9}) == Action("ignore", 9)  # nothing runs under that id
    rules.receive({"op": "generate", "id": 9})
    assert rules.receive({"op": "cancel", "id": 9}) == Action("cancel", 9)


def test_the_client_numbers_requests_and_routes_replies():
    rules = ClientRules()
    assert [rules.next_id() for _ in range(3)] == [1, 2, 3]
    assert rules.route({"op": "ping", "id": 0}) == "ping"
    assert rules.route({"op": "error", "id": 0, "code": "protocol"}) == "closing"
    assert rules.route({"op": "error", "id": 2}) == "request"
    assert rules.route({"op": "event", "id": 2}) == "request"
