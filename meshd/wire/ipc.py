"""Same-host fast path: hand a CUDA tensor to another process through CUDA IPC instead of TCP.

When two stages run on GPUs of one host (or both on one GPU), the stream does not need to cross
loopback TCP: the sender exports its tensor's device memory, the receiver maps it and copies it to
its own GPU (a device-to-device or peer copy over NVLink / PCIe). Whether it works is established by
trying at prepare time (:func:`probe_tensor` / :func:`check_probe`), never assumed: consumer boxes
often lack peer access, containers may hide the other GPU. Everything that crosses the wire is plain
data (ints and bytes); nothing is unpickled.

torch's own IPC plumbing (the one torch.multiprocessing uses) does the work: the exported block stays
valid while the sender holds the tensor, which it does until the receiver's reply.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import re
from pathlib import Path

import torch

from ..errors import MeshError

PROBE_ELEMENTS = 4096
#: torch's IPC handles: a CUDA memory/event handle is 64 bytes (torch may prefix a byte or two).
MAX_HANDLE_BYTES = 128
#: torch's reference-counter files are named by at::NewProcessWideShmHandle and hold this many slots
#: (CUDA_IPC_REF_COUNTER_FILE_SIZE): torch decrements the slot when the mapping is let go, so a peer
#: must not be able to point it at another file or beyond the file.
REF_HANDLE = re.compile(rb"/torch_\d{1,10}_\d{1,20}_\d{1,20}")
REF_COUNTER_SLOTS = 10000


def is_local_peer(address: tuple | None) -> bool:
    """True when a connection's peer address (``Connection.address``, as the socket gives it) is on
    this host: a loopback address or one of this host's own. CUDA memory handles are taken only from
    such connections. No address (the socket was gone already) is not local."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return False
    try:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or str(ip) in _own_addresses()


@functools.lru_cache(maxsize=1)
def _own_addresses() -> frozenset[str]:
    import psutil  # noqa: PLC0415

    return frozenset(a.address.split("%", 1)[0] for addrs in psutil.net_if_addrs().values() for a in addrs)


def _check_handles(desc: dict) -> None:
    for name in ("handle", "ref_handle", "event_handle"):
        value = desc[name]
        if not isinstance(value, bytes) or len(value) > MAX_HANDLE_BYTES:
            raise MeshError("bad-request", f"ipc {name} must be at most {MAX_HANDLE_BYTES} bytes")
    if len(desc["handle"]) == 0 or REF_HANDLE.fullmatch(desc["ref_handle"]) is None:
        raise MeshError("bad-request", "ipc descriptor does not name torch's own memory and reference-counter handles")
    for name, top in (("ref_offset", REF_COUNTER_SLOTS), ("offset", 1 << 48), ("size", 1 << 48),
                      ("storage_offset", 1 << 48)):
        value = desc[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < top:
            raise MeshError("bad-request", f"ipc {name} {value!r:.30} is out of range")


@functools.cache
def _address_range():
    fn = ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return fn


def _check_mapping(ptr: int, nbytes: int) -> None:
    """The mapped block really spans ``nbytes`` from ``ptr`` (the driver's word, not the peer's)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = _address_range()(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise MeshError("bad-request", f"mapped ipc memory has no address range (CUDA driver error {rc})")
    if not base.value <= ptr or ptr + nbytes > base.value + size.value:
        raise MeshError("bad-request", f"ipc descriptor claims {nbytes} bytes; the shared block holds "
                                       f"{base.value + size.value - ptr}")


@functools.cache
def host_id() -> str:
    """Identifies this machine boot (equal for every process of the host, namespaces included)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _device_for(uuid: str) -> torch.device:
    for i in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", i)) == uuid:
            return torch.device("cuda", i)
    raise MeshError("mismatch", f"GPU {uuid} is not visible to this process")


def export(tensor: torch.Tensor) -> dict:
    """Plain-data description of a CUDA tensor another process of this host can map."""
    storage = tensor.untyped_storage()
    (_, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = storage._share_cuda_()
    return {
        "gpu": gpu_uuid(tensor.device),
        "handle": bytes(handle),
        "size": int(size),
        "offset": int(offset),
        "ref_handle": bytes(ref_handle),
        "ref_offset": int(ref_offset),
        "event_handle": bytes(event_handle) if event_handle else b"",
        "event_sync": bool(event_sync),
        "shape": list(tensor.shape),
        "stride": list(tensor.stride()),
        "storage_offset": int(tensor.storage_offset()),
        "dtype": str(tensor.dtype).removeprefix("torch."),
    }


def import_copy(desc: object, device: torch.device, expect_shape, expect_dtype: torch.dtype) -> torch.Tensor:
    """Map an exported tensor and copy it into a new tensor on ``device`` (then let the mapping go)."""
    if not isinstance(desc, dict):
        raise MeshError("bad-request", "ipc descriptor must be a map")
    try:
        shape, stride = [int(v) for v in desc["shape"]], [int(v) for v in desc["stride"]]
        if tuple(shape) != tuple(expect_shape) or desc["dtype"] != str(expect_dtype).removeprefix("torch."):
            raise MeshError("bad-request", f"ipc tensor {shape} {desc['dtype']} is not the expected "
                                           f"{list(expect_shape)} {expect_dtype}")
        _check_handles(desc)
        _check_extent(shape, stride, desc["storage_offset"], desc["size"], expect_dtype)
        source = _device_for(str(desc["gpu"]))
        storage = torch.UntypedStorage._new_shared_cuda(
            source.index, desc["handle"], desc["size"], desc["offset"], desc["ref_handle"],
            desc["ref_offset"], desc["event_handle"] or None, desc["event_sync"] is True,
        )
        with torch.cuda.device(source):
            _check_mapping(storage.data_ptr(), desc["size"])
        remote = torch.empty(0, dtype=expect_dtype, device=source).set_(storage, desc["storage_offset"], shape, stride)
        local = torch.empty(shape, dtype=expect_dtype, device=device)
        local.copy_(remote)
        torch.cuda.current_stream(device).synchronize()
        del remote, storage
        return local
    except MeshError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, OSError, AttributeError) as exc:
        raise MeshError("bad-request", f"cannot map the peer's CUDA memory: {str(exc).splitlines()[0]}") from None


def _check_extent(shape: list[int], stride: list[int], storage_offset: int, size: int, dtype: torch.dtype) -> None:
    """The view a descriptor asks for must be a dense, contiguous tensor lying wholly inside the memory
    block the exporter shared: otherwise the copy would read GPU memory beyond it (a page fault kills
    this process's CUDA context), whatever the peer claims."""
    dense = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        dense[i] = dense[i + 1] * shape[i + 1]
    if any(st != d for n, st, d in zip(shape, stride, dense) if n > 1) or len(stride) != len(shape):
        raise MeshError("bad-request", f"ipc tensor strides {stride} are not the contiguous {dense}")
    numel = 1
    for n in shape:
        numel *= n
    end = (storage_offset + numel) * dtype.itemsize
    if storage_offset < 0 or size < 0 or end > size:
        raise MeshError("bad-request", f"ipc tensor (offset {storage_offset}, {numel} elements of {dtype.itemsize} "
                                       f"bytes) does not fit in the shared block of {size} bytes")


def probe_tensor(device: torch.device) -> torch.Tensor:
    """A small tensor with a known pattern, exported at prepare to test the same-host path."""
    return torch.arange(PROBE_ELEMENTS, dtype=torch.float32, device=device)


def check_probe(desc: object, device: torch.device) -> bool:
    copy = import_copy(desc, device, (PROBE_ELEMENTS,), torch.float32)
    return bool(torch.equal(copy.cpu(), torch.arange(PROBE_ELEMENTS, dtype=torch.float32)))


def collect() -> None:
    """Free exported blocks every consumer has released (torch keeps them in limbo until then)."""
    torch.cuda.ipc_collect()
