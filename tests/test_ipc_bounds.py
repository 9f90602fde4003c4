"""A CUDA IPC descriptor from a peer is checked against the memory block it says was shared before
anything maps it: a view beyond the block, or a strided one, would read foreign GPU memory."""

import pytest
import torch

from meshd.wire import ipc
from meshd.errors import MeshError


def desc(shape, stride, storage_offset=0, size=None, dtype="bfloat16"):
    numel = 1
    for n in shape:
        numel *= n
    return {"gpu": "GPU-none", "handle": bytes(64), "size": numel * 2 if size is None else size, "offset": 0,
            "ref_handle": b"/torch_4242_123456_0", "ref_offset": 0, "event_handle": b"", "event_sync": False,
            "shape": shape, "stride": stride, "storage_offset": storage_offset, "dtype": dtype}


@pytest.mark.parametrize("bad, cause", [
    (desc([1, 16, 8], [128, 8, 1], size=255), "does not fit"),  # one byte short
    (desc([1, 16, 8], [128, 8, 1], storage_offset=1), "does not fit"),  # shifted past the end
    (desc([1, 16, 8], [128, 8, 1], storage_offset=-4, size=10**9), "storage_offset -4 is out of range"),
    (desc([1, 16, 8], [128, 1, 16]), "not the contiguous"),  # transposed: same numel, other extent
    (desc([1, 16, 8], [128, 80, 1], size=10**6), "not the contiguous"),  # gaps between rows
    (desc([1, 16, 8], [8, 1]), "not the contiguous"),
])
def test_a_descriptor_beyond_or_across_its_block_is_refused_before_mapping(bad, cause):
    with pytest.raises(MeshError) as info:
        ipc.import_copy(bad, torch.device("cpu"), (1, 16, 8), torch.bfloat16)
    assert info.value.code == "bad-request" and cause in info.value.message


def test_a_dense_view_inside_its_block_gets_past_the_bounds_check():
    # Only the mapping itself fails here (no GPU named "GPU-none"): the bounds are fine, including a
    # batch dimension of 1 whose stride is not the dense one (a slice of a longer sequence).
    ok = desc([1, 16, 8], [1024, 8, 1], storage_offset=8, size=(8 + 128) * 2)
    with pytest.raises(MeshError) as info:
        ipc.import_copy(ok, torch.device("cpu"), (1, 16, 8), torch.bfloat16)
    # What refused it is the GPU lookup that comes after every bounds check.
    assert info.value.code == "mismatch" and "GPU-none is not visible" in info.value.message


@pytest.mark.parametrize("field, value, cause", [
    ("handle", 60_000_000_000, "handle must be at most"),  # bytes(int) would allocate that much
    ("handle", bytes(4096), "handle must be at most"),
    ("handle", b"", "does not name torch's own"),
    ("ref_handle", b"/dev/shm/../etc/passwd", "does not name torch's own"),  # torch decrements a counter there
    ("ref_handle", "/torch_1_2_3", "ref_handle must be at most"),
    ("ref_offset", 10000, "ref_offset 10000 is out of range"),  # beyond the counter file
    ("ref_offset", -1, "ref_offset -1 is out of range"),
    ("offset", -8, "offset -8 is out of range"),
    ("size", 1 << 60, "size 1152921504606846976 is out of range"),
    ("size", True, "size True is out of range"),
])
def test_handles_and_offsets_a_peer_makes_up_are_refused_before_torch_sees_them(field, value, cause):
    bad = {**desc([1, 16, 8], [128, 8, 1]), field: value}
    with pytest.raises(MeshError, match=cause) as info:
        ipc.import_copy(bad, torch.device("cpu"), (1, 16, 8), torch.bfloat16)
    assert info.value.code == "bad-request"


@pytest.mark.parametrize("address, local", [
    (("127.0.0.1", 5000), True), (("::1", 5000, 0, 0), True), (("::ffff:127.0.0.1", 7777, 0, 0), True),
    (("192.0.2.7", 7777), False), (("2001:db8::1", 7777, 0, 0), False), (("not-an-address", 1), False),
    (None, False), ((), False),
])
def test_cuda_handles_are_taken_only_from_this_host(address, local):
    assert ipc.is_local_peer(address) is local


async def test_a_loopback_connection_is_local_by_its_socket_address_not_its_name():
    import socket

    from meshd.wire.connection import Connection

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    served, _ = listener.accept()
    try:
        conn = Connection(served, "a name that is no address")  # the name is for people, not for this test
        assert ipc.is_local_peer(conn.address) is True
    finally:
        for s in (client, served, listener):
            s.close()
