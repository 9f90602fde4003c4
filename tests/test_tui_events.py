"""The events a generation and a split load report, as the client reads them (meshtui.events).

One ``from_wire`` per frame: every kind a daemon sends becomes its type, a newer daemon's kind a
generic event, and a field of the wrong type fails the request with a line naming the field. The
last tests run a real sealed loopback connection to a head that sends such frames.
"""

from __future__ import annotations

import asyncio

import pytest

from meshd.errors import ProtocolViolation
from meshd.model.compile_events import compiled_event, compiling_event
from meshd.node.info import NodeInfo
from meshd.pipeline.blocks import BlockRange
from meshd.pipeline.plan import PeerAddress, SplitPlan, Stage
from meshd.pipeline.progress import HopRecord, StageInfo, StepRecord
from meshd.pipeline.request import GenerationParams
from meshd.wire.channel import Channel, ServerSession
from meshtui.cli import progress_lines
from meshtui.events import (Compiled, Compiling, Decoding, Encoding, LoadDone, LoadProgress, LoadStarted, OtherEvent,
                            Prepared, Queued, Retry, from_wire)
from meshtui.mesh import Mesh
from tests.daemons import sealed_pair

STEP = {"op": "event", "id": 5, "kind": "step", "step": 2, "steps": 4, "ms": 12.5, "head_ms": 1.0,
        "passes": [{"compute_ms": 3.0, "hops": [{"from": "a", "node": "b", "blocks": [3, 5], "codec": "fp8",
                                                 "bytes": 9216, "encode_ms": 0.4, "wire_ms": 1.2, "decode_ms": 0.3,
                                                 "compute_ms": 4.5, "error": {"cosine": 0.9999, "rel_l2": 0.01,
                                                                              "max_abs": 0.03}}]}]}


def test_each_kind_the_head_sends_reads_as_its_type():
    assert from_wire({"kind": "queued", "position": 2}) == Queued(2)
    assert from_wire({"kind": "encoding", "text_encoder": "10.0.0.2:7777"}) == Encoding("10.0.0.2:7777")
    assert from_wire({"kind": "decode"}) == Decoding()
    prepared = from_wire({"kind": "prepared", "plan": "A:0-2 -> B:3-5", "distilled": True, "cfg": False, "stages": [
        {"peer": "10.0.0.1:7777", "node": "a", "blocks": [0, 3], "link": {"to": "10.0.0.2:7777", "bandwidth_bps": 1e9}},
        {"peer": "10.0.0.2:7777", "node": "b", "blocks": [3, 6]}]})
    assert isinstance(prepared, Prepared) and (prepared.plan, prepared.distilled, prepared.cfg) == ("A:0-2 -> B:3-5",
                                                                                                    True, False)
    assert [s.blocks for s in prepared.stages] == [BlockRange(0, 3), BlockRange(3, 6)]
    assert prepared.stages[0].link.bandwidth_bytes_per_s == 1e9 and prepared.stages[1].link is None
    step = from_wire(STEP)
    assert step == StepRecord.from_wire(STEP)  # meshd's record, as the summary's steps are read
    (hop,) = step.passes[0].hops
    assert isinstance(hop, HopRecord) and (hop.sender, hop.receiver, hop.blocks, hop.cosine) == (
        "a", "b", BlockRange(3, 6), 0.9999)


def test_a_peer_being_loaded_reports_progress_and_compiles_in_meshds_words():
    assert from_wire({"kind": "load", "done": 3, "total": 8}, "B") == LoadProgress("B", 3, 8)
    compiling = from_wire(compiling_event("b", "16-31", False, "1024x1024", 4608, False, 18.2), "B")
    assert compiling == Compiling("B", "b", "16-31", "1024x1024", 4608, False, 18.2, False)
    assert compiling.describe() == "compiling blocks 16-31 on b for 1024x1024 (first time, ~18 s)"
    head = from_wire(compiling_event("a", "0-15", True, "1024x1024", 4608, True, 3.0), "A")
    assert head.describe() == "compiling blocks 0-15 and the VAE decoder on a for 1024x1024 (from the compile cache, ~3 s)"
    decoder = from_wire(compiling_event("a", "", True, "1024x1024", 4608, False, None), "A")
    assert decoder.describe() == "compiling the VAE decoder on a for 1024x1024 (first time)"
    compiled = from_wire(compiled_event("b", 17.46), "B")
    assert compiled == Compiled("B", "b", 17.46) and compiled.describe() == "compiled on b in 17.5 s"
    relayed = from_wire({"kind": "compiling", "node": "c", "blocks": "0-5", "size": "64x64", "cached": True})
    assert relayed.peer is None and relayed.describe() == "compiling blocks 0-5 on c for 64x64 (from the compile cache)"


def test_a_newer_daemons_kind_is_kept_as_a_generic_event_and_shown_nowhere():
    event = from_wire({"op": "event", "id": 9, "kind": "warming", "cache": "hot"})
    assert event == OtherEvent("warming", {"cache": "hot"})
    assert progress_lines(event) == []


@pytest.mark.parametrize("header, field", [
    ({"kind": "queued", "position": "2"}, "'position' must be an integer, not str"),
    ({"kind": "queued"}, "'position' must be an integer, it is missing"),
    ({"kind": "step", "step": 1, "steps": True}, "'steps' must be an integer, not bool"),
    ({"kind": "step", "step": 1, "steps": 2, "passes": {}}, "'passes' must be a list, not dict"),
    ({"kind": "step", "step": 1, "steps": 2, "ms": "fast"}, "'ms' must be a number, not str"),
    ({"kind": "prepared", "plan": "A:0-5", "stages": "all"}, "'stages' must be a list, not str"),
    ({"kind": "prepared", "plan": "A:0-5", "cfg": 1}, "'cfg' must be true or false, not int"),
    ({"kind": "encoding", "text_encoder": 7}, "'text_encoder' must be text, not int"),
    ({"kind": "compiling", "estimate_s": "soon"}, "'estimate_s' must be a number, not str"),
    ({"kind": "load", "done": 1, "total": 2.5}, "'total' must be an integer, not float"),
    ({"kind": ["step"]}, "field 'kind' must be text, not list"),
])
def test_a_field_of_the_wrong_type_is_a_protocol_violation_naming_it(header, field):
    with pytest.raises(ProtocolViolation, match=field) as error:
        from_wire(header, sender="10.0.0.1:7777")
    assert error.value.peer == "10.0.0.1:7777"


def test_the_headless_command_tells_each_event_in_one_line():
    assert progress_lines(from_wire(STEP)) == [
        "step 2/4     12.5 ms  head 3.0 ms  -> b fp8 9.0 KiB enc 0.4 wire 1.2 dec 0.3 run 4.5 ms cos 0.99990"]
    assert progress_lines(LoadStarted("B", (BlockRange(0, 16), BlockRange(20, 21)))) == ["B: loading blocks 0-15,20"]
    assert progress_lines(LoadDone("B", 1.5)) == ["B: loaded"]
    assert progress_lines(Queued(1)) == [] and progress_lines(Queued(3)) == ["queued at position 3"]
    assert progress_lines(Retry("B", "B stopped answering", 1)) == [
        "lost peer B: B stopped answering; re-planning over the peers left"]
    prepared = Prepared("A:0-2 -> B:3-5", StageInfo.many_from_wire([
        {"peer": "10.0.0.1:7777", "node": "a", "link": {"to": "10.0.0.2:7777", "codec": "u8", "bandwidth_bps": 1.25e8}},
        {"peer": "10.0.0.2:7777", "node": "b"}]), False, True)
    assert progress_lines(prepared) == ["plan A:0-2 -> B:3-5 (base model, CFG)",
                                        "  a -> 10.0.0.2:7777: u8 (1.00 Gbit/s measured)"]


# --- through a real connection --------------------------------------------------------------------

HEAD = PeerAddress("127.0.0.1", 7001)


async def head_sending(*frames: dict, linger: float = 0.0):
    """A mesh whose head, over a real sealed loopback connection, answers ``generate`` by sending
    ``frames`` as events, then (after ``linger`` seconds) a PNG; returns the mesh, its one-stage plan
    and what the head saw."""
    client, served = await sealed_pair()
    seen = {"cancelled": asyncio.Event()}

    async def generate(request):
        try:
            for fields in frames:
                await request.event(fields)
            await asyncio.sleep(linger)  # a cancel for an unreadable event arrives meanwhile
            return {"summary": {"total_s": 0.5}}, [b"\x89PNG"]
        except asyncio.CancelledError:
            seen["cancelled"].set()
            raise

    serving = asyncio.ensure_future(ServerSession(served, generate, {}).run())
    mesh = Mesh(None)
    head = mesh.add(HEAD)
    head.channel = Channel(client)
    head.info = NodeInfo.from_wire({"name": "a", "model": {"preset": "tiny", "hash": "h", "dtype": "bfloat16"}})
    plan = SplitPlan((Stage(HEAD, 0, 6, "auto", "A"),))
    return mesh, plan, serving, seen


async def test_generate_streams_typed_events_and_keeps_them_in_the_outcome():
    mesh, plan, serving, _ = await head_sending({"kind": "queued", "position": 1}, STEP, {"kind": "warming"},
                                                {"kind": "decode"})
    streamed = []
    try:
        outcome = await mesh.generate(plan, GenerationParams("p", 1, 64, 64, 4, 1.0), on_event=streamed.append)
    finally:
        await mesh.close()
        serving.cancel()
    assert outcome.events == streamed == [Queued(1), from_wire(STEP), OtherEvent("warming", {}), Decoding()]
    assert outcome.summary == {"total_s": 0.5}


async def test_an_unreadable_event_fails_the_generation_naming_the_field_and_cancels_it_on_the_head():
    mesh, plan, serving, seen = await head_sending({"kind": "step", "step": 1, "steps": "four"}, linger=30)
    try:
        with pytest.raises(ProtocolViolation, match="step event: field 'steps' must be an integer, not str") as error:
            await mesh.generate(plan, GenerationParams("p", 1, 64, 64, 4, 1.0))
        assert error.value.peer == str(HEAD)  # named by its address, as every peer error is
        await asyncio.wait_for(seen["cancelled"].wait(), 5)  # the head stops working for nobody
    finally:
        await mesh.close()
        serving.cancel()
