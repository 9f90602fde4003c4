"""A CUDA IPC descriptor from a peer is checked against the memory block it says was shared before
anything maps it: a view beyond the block, or a strided one, would read foreign GPU memory."""

import pytest
import torch

from meshd import ipc
from meshd.errors import MeshError


def desc(shape, stride, storage_offset=0, size=None, dtype="bfloat16"):
    numel = 1
    for n in shape:
        numel *= n
    return {"gpu": "GPU-none", "handle": b"h", "size": numel * 2 if size is None else size, "offset": 0,
            "ref_handle": b"r", "ref_offset": 0, "event_handle": b"", "event_sync": False,
            "shape": shape, "stride": stride, "storage_offset": storage_offset, "dtype": dtype}


@pytest.mark.parametrize("bad, cause", [
    (desc([1, 16, 8], [128, 8, 1], size=255), "does not fit"),  # one byte short
    (desc([1, 16, 8], [128, 8, 1], storage_offset=1), "does not fit"),  # shifted past the end
    (desc([1, 16, 8], [128, 8, 1], storage_offset=-4, size=10**9), "does not fit"),
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
    assert "does not fit" not in info.value.message and "contiguous" not in info.value.message
