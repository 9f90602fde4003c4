"""Records that cross the seams are parsed once into types: what a peer says about itself, what a
generation reports, the blocks a stage holds. Untrusted maps read as unknown, never as a crash or a 0."""

import pytest

from meshd.pipeline.blocks import BlockRange, blocks_shown
from meshd.model.precision import Fp8Compute
from meshd.node.info import ModelInfo, NodeInfo, compute_difference, disagreement
from meshd.pipeline.progress import LinkInfo, StageInfo, StepRecord, hops_from_wire

MODEL = {"model_id": "klein-9b", "preset": "klein-9b", "hash": "ab" * 32, "dtype": "bfloat16",
         "weights": "fp8 e4m3fn per-row 192, bf16 9"}


def test_block_ranges_are_half_open_inside_and_inclusive_where_a_user_reads_them():
    stage = BlockRange.from_wire([0, 16])
    assert (stage.start, stage.end, len(stage), stage.shown()) == (0, 16, 16, "0-15")
    assert BlockRange.from_inclusive([16, 31]) == BlockRange(16, 32)  # a hop record's first and last block
    assert BlockRange(7, 8).shown() == "7" and blocks_shown([BlockRange(0, 2), BlockRange(5, 6)]) == "0-1,5"
    assert blocks_shown([]) == "none"
    for bad in ([3, 3], [5, 2], [-1, 4], [0, True], "0-15", [0], None):
        assert BlockRange.from_wire(bad) is None
    with pytest.raises(ValueError):
        BlockRange(4, 4)


def test_node_info_is_read_once_and_wrong_shapes_are_unknown_not_zero():
    info = NodeInfo.from_wire({"node_id": "n1", "name": "tower", "model": MODEL, "blocks": [[0, 8], [8, 4], "x"],
                               "memory": {"kind": "gpu", "free": 3 << 30, "total": "lots"}, "jobs": True,
                               "caps": {"nvenc": "yes"}, "host_id": "boot-1"})
    assert info.model == ModelInfo.from_wire(MODEL) and info.blocks == (BlockRange(0, 8),)
    assert info.held == frozenset(range(8)) and info.free_bytes == 3 << 30
    assert info.total_bytes is None and info.jobs is None and info.caps is None  # not 0, not a crash
    assert info.host and info.host == NodeInfo(host_id="boot-1").host != NodeInfo(host_id="boot-2").host
    assert NodeInfo.from_wire("not a map") == NodeInfo()


def test_peers_agree_on_a_model_only_with_the_same_precision_of_the_weights():
    same = ModelInfo.from_wire(MODEL)
    bf16 = ModelInfo.from_wire({**MODEL, "weights": "bf16"})
    assert disagreement([("A", same), ("B", ModelInfo.from_wire(dict(MODEL)))]) is None
    problem = disagreement([("A", same), ("B", bf16)])
    assert problem.startswith("peers serve different models: A serves klein-9b (klein-9b, bfloat16, sha256 abab")
    assert "B serves klein-9b (klein-9b, bfloat16, sha256 abababababab, weights bf16)" in problem


def test_peers_that_compute_fp8_layers_by_different_paths_get_a_note_not_a_refusal():
    """A 4090 (native fp8 matmul) and a 3090 (dequantise per layer) can serve one fp8 plan, but its image is
    neither card's all-local image: the user is told; GPUs of one path, whatever their reason, are not."""
    def peer(compute: Fp8Compute) -> ModelInfo:
        return ModelInfo.from_wire({**MODEL, "compute": "fp8: " + compute.describe()})

    h200 = peer(Fp8Compute(True, "compute capability 9.0 (NVIDIA H200)", "rowwise"))
    rtx4090 = peer(Fp8Compute(True, "compute capability 8.9 (NVIDIA GeForce RTX 4090)", "rowwise"))
    rtx3090 = peer(Fp8Compute(False, "compute capability 8.6 < 8.9: no fp8 tensor cores"))
    assert h200.agreement == rtx3090.agreement  # they can serve one plan
    assert compute_difference([("A", h200), ("B", rtx4090)]) is None
    note = compute_difference([("A", rtx4090), ("B", rtx3090)])
    assert note == ("peers compute fp8 layers differently (A: native fp8 matmul, activations scaled per token; "
                    "B: dequantised to the compute dtype): the image differs slightly from an all-local run on any "
                    "one of them")
    dense = ModelInfo.from_wire({**MODEL, "compute": "dense bfloat16"})
    assert compute_difference([("A", dense), ("B", rtx3090)]) is None  # nothing to compare with


def test_every_hop_carries_its_sender():
    hops = hops_from_wire([
        {"from": "a", "node": "b", "blocks": [3, 5], "codec": "u8", "bytes": 100, "error": {"cosine": 0.99}},
        {"node": "c", "blocks": [6, 7], "codec": "raw", "bytes": "many"},
        "junk",
    ])
    assert [(h.sender, h.receiver, h.link) for h in hops] == [("a", "b", "a -> b"), ("b", "c", "b -> c")]
    assert hops[0].blocks == BlockRange(3, 6) and hops[0].cosine == 0.99 and hops[0].rel_l2 is None
    assert hops[1].wire_bytes is None


def test_step_events_and_prepared_stages_parse_once():
    step = StepRecord.from_wire({"kind": "step", "step": 2, "steps": 4, "ms": 12.5,
                                 "passes": [{"compute_ms": 3.0, "hops": [{"from": "a", "node": "b"}]}]})
    assert (step.step, step.steps, step.ms, step.passes[0].compute_ms) == (2, 4, 12.5, 3.0)
    assert step.passes[0].hops[0].link == "a -> b"
    assert StepRecord.from_wire({"kind": "step", "step": "bogus"}) is None
    (stage, last) = StageInfo.many_from_wire([
        {"peer": "10.0.0.1:7777", "node": "a", "blocks": [0, 3],
         "link": {"to": "10.0.0.2:7777", "bandwidth_bps": 1.25e8, "rtt_ms": 0.4, "codec": "u8", "emulated": True}},
        {"peer": "10.0.0.2:7777", "blocks": [3, 6]}, {"blocks": [0, 1]}])
    assert stage.blocks == BlockRange(0, 3) and last.link is None
    assert stage.link == LinkInfo("10.0.0.2:7777", "tcp", 1.25e8, 0.4, "u8", None, True)
    ipc = LinkInfo.from_wire({"to": "x:1", "transport": "cuda-ipc", "bandwidth_bps": 0})
    assert ipc.transport == "cuda-ipc" and ipc.bandwidth_bytes_per_s is None  # unknown, not 0
    # the shared-memory path between daemons of one host is itself, not TCP without a bandwidth
    shm = LinkInfo.from_wire({"to": "x:1", "transport": "host-shm", "codec": "raw"})
    assert shm.transport == "host-shm"
    assert LinkInfo.from_wire({"to": "x:1", "transport": "carrier-pigeon"}).transport == "tcp"
