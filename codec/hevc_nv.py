"""HEVC 4:4:4 on NVIDIA video silicon through PyNvVideoCodec: NVENC to encode, NVDEC to decode.

PyNvVideoCodec is imported lazily: its import loads the driver's ``libnvidia-encode.so.1`` and fails
on machines without an NVIDIA driver (or in containers without the ``video`` capability). That is
a normal case reported by :func:`codec.probe` with a one-line reason, never a crash.

Sessions are expensive to open (hundreds of ms), so encoders and decoders are kept per frame
geometry and reused. Several sessions run in parallel threads to use several engines (an H200 has
seven NVDEC engines; a GeForce card two or three NVENC engines). NVENC sessions are scarce (8 per
GeForce system, shared with every other program): they come from one process-wide
:class:`SessionBudget` per GPU. The API this module speaks is PyNvVideoCodec 2.2.x's, as read from
its wheel: docs/nvenc.md.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CodecError, CodecUnavailable
from .hevc_cpu import check_crc

log = logging.getLogger(__name__)

_PROBE_STREAM = Path(__file__).with_name("data") / "probe-444-144.hevc"
_PROBE_SIDE = 144

_nvc = None
_nvc_error: str | None = None
_nvc_lock = threading.Lock()


def _one_line(exc: BaseException) -> str:
    # The binding's messages span lines ("PyNvEncoderCaps :" then the NVENC status on the next, as
    # seen on the H200): fold them into one, or the status that classifies the failure is lost.
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:397] + "..."
    return text if isinstance(exc, CodecError) else f"{type(exc).__name__}: {text}".strip()


def import_nvc():
    """Import PyNvVideoCodec once; raise CodecUnavailable with a one-line reason if it cannot load."""
    global _nvc, _nvc_error
    with _nvc_lock:
        if _nvc is None and _nvc_error is None:
            # Its import logs a long troubleshooting text at ERROR when the driver is missing;
            # we report one line instead.
            quiet = logging.getLogger("PyNvVideoCodec")
            quiet.addHandler(logging.NullHandler())
            quiet.propagate = False
            try:
                import PyNvVideoCodec  # noqa: PLC0415

                version = str(getattr(PyNvVideoCodec, "__version__", "?"))
                if version.startswith(SUPPORTED_SERIES):
                    _nvc = PyNvVideoCodec
                else:
                    _nvc_error = (f"PyNvVideoCodec {version} is installed; flux-mesh speaks the "
                                  f"{SUPPORTED_SERIES}x API (pip install 'PyNvVideoCodec=={SUPPORTED_SERIES}*')")
            except Exception as exc:  # noqa: BLE001 - ImportError, RuntimeError, OSError...
                _nvc_error = f"PyNvVideoCodec cannot load: {_one_line(exc)}"
        if _nvc is None:
            raise (NvencVersionError if "is installed;" in _nvc_error else CodecUnavailable)(_nvc_error)
        return _nvc


def reset_import() -> None:
    """Forget the import's outcome, so the next :func:`import_nvc` tries again (``meshd check``)."""
    global _nvc, _nvc_error
    with _nvc_lock:
        _nvc, _nvc_error = None, None


def probe_pattern() -> np.ndarray:
    """The planes encoded in the probe stream (3 x 144 x 144 blocks of constant value)."""
    i = np.arange(_PROBE_SIDE)[:, None]
    j = np.arange(_PROBE_SIDE)[None, :]
    return np.stack(
        [(i // 16) * 16 + (j // 16), (j // 16) * 16 + (i // 16) + 64, ((i + j) // 16) * 8 + 128]
    ).astype(np.uint8)


def probe_stream() -> bytes:
    """A 144x144 lossless HEVC 4:4:4 IDR frame (made with libx265) used to prove a decoder works."""
    return _PROBE_STREAM.read_bytes()


#: NVENCSTATUS codes (nvEncodeAPI.h) that mean "this GPU has no usable NVENC at all", as opposed to
#: "NVENC is there but failing" (a full session table, a transient VRAM shortage, a bad call).
NO_ENCODE_DEVICE, UNSUPPORTED_DEVICE, OUT_OF_MEMORY = 1, 2, 10
_ABSENT_CODES = {NO_ENCODE_DEVICE, UNSUPPORTED_DEVICE}
_STATUS = re.compile(r"returned error (\d+)")
#: The packet format this module reads (lists of dicts) is that of 2.2.x; 2.0 and 2.1 returned a
#: host bitstream from ``Encode``.
SUPPORTED_SERIES = "2.2."


class NvencVersionError(CodecUnavailable):
    """PyNvVideoCodec loads but is not the 2.2.x API this module speaks."""


def nvenc_absent(reason: str) -> bool:
    """True when a failure text means the GPU has no NVENC (not that NVENC failed)."""
    match = _STATUS.search(reason)
    if match:
        return int(match.group(1)) in _ABSENT_CODES
    return "YUV444 is not supported" in reason or "NVENC library file is not found" in reason


def session_limit_hit(reason: str) -> bool:
    """True for NV_ENC_ERR_OUT_OF_MEMORY: the system's session table (8 on GeForce) is full, or VRAM is."""
    match = _STATUS.search(reason)
    return bool(match) and int(match.group(1)) == OUT_OF_MEMORY


@dataclass(frozen=True)
class NvCaps:
    nvenc: bool
    nvenc_reason: str
    nvenc_engines: int
    nvdec: bool
    nvdec_reason: str
    nvdec_engines: int
    nvenc_state: str = "absent"  # "ok", "absent" (no NVENC here) or "failing" (NVENC there, not working)


def gpu_of(device: torch.device) -> int:
    """The CUDA ordinal of ``device``; NVENC of GPU 0 for host (CPU-device) frames."""
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def _decoder_engines(nvc, gpu: int) -> int:
    try:
        chroma = next(getattr(nvc.cudaVideoChromaFormat, n) for n in dir(nvc.cudaVideoChromaFormat) if "444" in n)
        caps = nvc.GetDecoderCaps(gpu, nvc.cudaVideoCodec.HEVC, chroma, 8)
        return int(dict(caps).get("num_decoder_engines", 0)) or 1
    except Exception as exc:  # noqa: BLE001 - caps are advisory
        log.debug("GetDecoderCaps failed: %s", exc)
        return 1


#: The two configurations real use opens; the probe tries both, so neither is first tried mid-run.
PROBE_QPS = (None, 18)
_PROBE_ENCODE_SIDE = 256


def probe_nvenc(device: torch.device) -> tuple[str, str, int]:
    """Open each encoder configuration on ``device`` and encode a frame: (state, reason, engines).

    ``state`` is ``ok``, ``absent`` (no NVENC on this GPU, or no driver library) or ``failing``
    (NVENC present but not working: that is a fault to show loudly, not a missing feature).
    The probe's session comes from the process-wide budget (:data:`SESSIONS`) like any other: a
    re-probe while encoders hold sessions takes one of theirs (or waits), never one more. Sessions
    are released before returning.
    """
    try:
        nvc = import_nvc()
    except NvencVersionError as exc:
        return "failing", str(exc), 0
    except CodecUnavailable as exc:
        # The wheel's own import refuses an old driver ("Driver version is too old"): a fault to fix.
        old_driver = "too old" in str(exc) or "upgrade driver" in str(exc)
        return ("failing" if old_driver else "absent"), str(exc), 0
    side = _PROBE_ENCODE_SIDE
    frame = torch.zeros((1, 3 * side, side), dtype=torch.uint8, device=device)
    frame[0, side:2 * side] = 128
    error = None
    try:
        encoder = NvEncoder(device, sessions=1)
        try:
            for qp in PROBE_QPS:
                if len(encoder.encode(frame, qp)[0]) == 0:
                    raise CodecError("NVENC produced an empty frame")
        finally:
            encoder.close()
        engines = int(dict(nvc.GetEncoderCaps(gpuid=gpu_of(device), codec="hevc")).get("num_encoder_engines", 1))
    except Exception as exc:  # noqa: BLE001 - classified below; nothing of it is kept
        error = _one_line(exc)
    if error is not None:
        if nvenc_absent(error):
            return "absent", f"no NVENC on this GPU: {error}", 0
        return "failing", f"NVENC is present but failing: {error}", 0
    engines = max(1, engines)
    return "ok", f"NVENC HEVC 4:4:4 lossless and constant-QP ({engines} engine{'s' if engines > 1 else ''})", engines


def probe_nv(device: torch.device) -> NvCaps:
    """Establish NVENC/NVDEC support on ``device`` by encoding with each encoder configuration and
    decoding a known frame."""
    state, nvenc_reason, engines = probe_nvenc(device)
    nvenc = state == "ok"
    if device.type != "cuda":
        return NvCaps(nvenc, nvenc_reason, engines, False, "not a CUDA device", 0, state)
    try:
        nvc = import_nvc()
    except CodecUnavailable as exc:
        return NvCaps(nvenc, nvenc_reason, engines, False, str(exc), 0, state)
    gpu = gpu_of(device)
    try:
        pool = NvDecoder(device, sessions=1)
        out = pool.decode([probe_stream()], _PROBE_SIDE, _PROBE_SIDE, device)
        if not np.array_equal(out[0].cpu().numpy().reshape(3, _PROBE_SIDE, _PROBE_SIDE), probe_pattern()):
            raise CodecError("NVDEC decoded the probe frame to wrong values")
        dec_engines = _decoder_engines(nvc, gpu)
        nvdec, nvdec_reason = True, f"NVDEC HEVC 4:4:4 ({dec_engines} engine{'s' if dec_engines > 1 else ''})"
    except Exception as exc:  # noqa: BLE001
        nvdec, nvdec_reason, dec_engines = False, f"NVDEC unusable: {_one_line(exc)}", 0
    return NvCaps(nvenc, nvenc_reason, engines, nvdec, nvdec_reason, dec_engines, state)


def _open_encoder(nvc, gpu: int, width: int, height: int, qp: int | None, host_input: bool):
    options = {
        "gpu_id": gpu,
        "codec": "hevc",
        "preset": "P1",
        "gop": 1,
        "idrperiod": 1,
        "bf": 0,
        "repeatspspps": 1,
    }
    if qp is None:
        options["tuning_info"] = "lossless"
    else:
        options.update(tuning_info="ultra_low_latency", rc="constqp", constqp=qp)
    return nvc.CreateEncoder(width, height, "YUV444", host_input, **options)


class _Plane:
    """One 8-bit plane as the binding's ``coerceToCudaArrayView`` reads it: (H, W, 1), strides (W, 1, 1).

    No ``stream`` key: 2.2.x copies on its own stream and ignores it, so the caller synchronises the
    producing stream before ``Encode``.
    """

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, pointer: int, height: int, width: int) -> None:
        self.__cuda_array_interface__ = {"shape": (height, width, 1), "strides": (width, 1, 1),
                                         "data": (pointer, False), "typestr": "|u1", "version": 3}


class DeviceFrame:
    """A ``[3H, W]`` uint8 CUDA frame the way NVIDIA's samples hand it to ``Encode`` (``AppFrame``):
    ``cuda()`` returns the Y, U, V planes; no ``__dlpack__`` anywhere (2.2.x would call it with the
    stream positionally, which torch >= 2.9 refuses). Holds the tensor, so its memory outlives the
    ``Encode`` call that copies from it."""

    def __init__(self, frame: torch.Tensor) -> None:
        if frame.dtype != torch.uint8 or frame.ndim != 2 or frame.shape[0] % 3 or not frame.is_contiguous():
            raise CodecError(f"NVENC frames are contiguous uint8 [3H, W]; got {frame.dtype} {tuple(frame.shape)}")
        self.tensor = frame
        height, width = frame.shape[0] // 3, frame.shape[1]
        base = frame.data_ptr()
        self._planes = [_Plane(base + i * height * width, height, width) for i in range(3)]

    def cuda(self) -> list[_Plane]:
        """The plane list (the name is what the binding tests for; nothing is copied)."""
        return self._planes


class SessionBudget:
    """At most ``limit`` open NVENC sessions per GPU in this process, whatever geometry or QP asks.

    A GeForce system has 8 sessions in all, shared by every process and card (OBS, browsers and
    Discord take some). Sessions are kept open for reuse (opening one costs hundreds of ms); a
    request for a new key closes the least recently used idle session when the budget is full, and
    waits when every session is busy. A failed session is dropped, never returned to the pool.

    A session closes when its last reference goes (the binding has no close method), and closing
    one is a driver call that takes milliseconds: sessions leaving the pool are collected under the
    lock and let go after it (:meth:`_let_go`), so that no other encoder waits on a destruction.
    """

    def __init__(self, limit: int = 2) -> None:
        self._limit = max(1, int(limit))
        self._idle: dict[int, OrderedDict] = {}  # gpu -> OrderedDict[(key, n) -> session], LRU first
        self._busy: dict[int, int] = {}
        self._serial = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        """Change the budget; idle sessions above it are closed now."""
        leaving = []
        with self._cond:
            self._limit = max(1, int(limit))
            for gpu in list(self._idle):
                while self._idle[gpu] and self.open_count(gpu) > self._limit:
                    leaving.append(self._idle[gpu].popitem(last=False)[1])
            self._cond.notify_all()
        self._let_go(leaving)

    @staticmethod
    def _let_go(leaving: list) -> None:
        """Drop the pool's last references to these sessions, outside the lock: that closes them."""
        leaving.clear()

    def open_count(self, gpu: int) -> int:
        """Sessions open on ``gpu`` (idle and busy)."""
        return len(self._idle.get(gpu, ())) + self._busy.get(gpu, 0)

    def acquire(self, gpu: int, key: tuple, open_session):
        """An idle session for ``key``, or a newly opened one within the budget."""
        leaving = []
        with self._cond:
            while True:
                idle = self._idle.setdefault(gpu, OrderedDict())
                for slot in idle:
                    if slot[0] == key:
                        session = idle.pop(slot)
                        self._busy[gpu] = self._busy.get(gpu, 0) + 1
                        return session
                if self.open_count(gpu) < self._limit:
                    break
                if idle:
                    leaving.append(idle.popitem(last=False)[1])  # the LRU idle session of another key
                    break
                self._cond.wait()
            self._busy[gpu] = self._busy.get(gpu, 0) + 1
        self._let_go(leaving)  # closed before ours opens: the system's session table has room again
        try:
            return self._open(gpu, open_session)
        except BaseException:
            self._done(gpu)
            raise

    def _open(self, gpu: int, open_session):
        try:
            return open_session()
        except Exception as exc:  # noqa: BLE001 - retried once below, else re-raised
            if not session_limit_hit(str(exc)):
                raise
            reason = _one_line(exc)
        # Other programs hold the system's sessions: give back our idle ones and try once more.
        with self._cond:
            leaving = list(self._idle.get(gpu, {}).values())
            self._idle.get(gpu, OrderedDict()).clear()
        freed = bool(leaving)
        self._let_go(leaving)
        if not freed:
            raise CodecError(f"NVENC has no free session: the system's limit (8 on GeForce, shared with OBS, "
                             f"browsers, Discord...) is reached ({reason})")
        return open_session()

    def release(self, gpu: int, key: tuple, session) -> None:
        """Return a healthy session for reuse."""
        leaving = []
        with self._cond:
            self._serial += 1
            self._idle.setdefault(gpu, OrderedDict())[(key, self._serial)] = session
            self._busy[gpu] -= 1
            while self.open_count(gpu) > self._limit and self._idle[gpu]:
                leaving.append(self._idle[gpu].popitem(last=False)[1])
            self._cond.notify_all()
        self._let_go(leaving)

    def discard(self, gpu: int) -> None:
        """Forget a busy session that failed (the caller drops its last reference: that closes it)."""
        self._done(gpu)

    def _done(self, gpu: int) -> None:
        with self._cond:
            self._busy[gpu] -= 1
            self._cond.notify_all()

    def close_idle(self, gpu: int | None = None) -> None:
        """Close every idle session (of ``gpu``, or of all GPUs)."""
        leaving = []
        with self._cond:
            for g, idle in self._idle.items():
                if gpu is None or g == gpu:
                    leaving += idle.values()
                    idle.clear()
            self._cond.notify_all()
        self._let_go(leaving)


#: The process-wide budget every NvEncoder draws from (meshd sets it from ``nvenc_sessions``).
SESSIONS = SessionBudget(2)


class _DecoderPool:
    """Idle NVDEC sessions per frame geometry, each used by one task at a time.

    Tasks run on a fixed-size thread pool, so at most that many sessions per geometry are open; the
    sessions of geometries unused for the last ``max_keys`` others are closed (NVDEC sessions hold
    surfaces in VRAM).
    """

    def __init__(self, max_keys: int = 4) -> None:
        self._free: OrderedDict[tuple, queue.SimpleQueue] = OrderedDict()
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def acquire(self, key: tuple, make):
        with self._lock:
            free = self._free.setdefault(key, queue.SimpleQueue())
            self._free.move_to_end(key)
            while len(self._free) > self._max_keys:
                self._free.popitem(last=False)
        try:
            return free.get_nowait()
        except queue.Empty:
            return make()

    def release(self, key: tuple, session) -> None:
        with self._lock:
            free = self._free.get(key)
        if free is not None:  # else its geometry was evicted meanwhile: the session closes with it
            free.put(session)


class PendingFrames:
    """Frames being decoded on the session threads; :meth:`result` waits for them."""

    def __init__(self, out: torch.Tensor, futures: list) -> None:
        self._out = out
        self._futures = futures

    def done(self) -> bool:
        """True once every frame is decoded (or failed): :meth:`result` will not wait."""
        return all(future.done() for future in self._futures)

    def result(self) -> torch.Tensor:
        errors = []
        for future in self._futures:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - wait for all, report the first
                errors.append(exc)
        if errors:
            raise errors[0]
        return self._out


class NvEncoder:
    """NVENC HEVC 4:4:4 encoder: ``[F, 3H, W]`` uint8 frames -> one Annex-B IDR frame each.

    CUDA frames go in as :class:`DeviceFrame` planes on their own GPU; frames of a CPU device go in
    as host buffers (``usecpuinputbuffer``) to GPU 0's NVENC. Sessions come from a
    :class:`SessionBudget`. NVENC holds 3 frames back (the SDK's output delay), so each session's run
    of frames ends with one ``EndEncode`` flush; the session takes new frames after it.
    """

    name = "nvenc"

    def __init__(self, device: torch.device, sessions: int = 1, budget: SessionBudget | None = None) -> None:
        self._nvc = import_nvc()
        self._device = device
        self._gpu = gpu_of(device)
        self._budget = budget or SESSIONS
        self._workers = max(1, sessions)
        self._threads = ThreadPoolExecutor(self._workers, thread_name_prefix="nvenc")

    def _encode_run(self, frames: torch.Tensor, qp: int | None) -> list[bytes]:
        count, rows, width = frames.shape
        host = frames.device.type != "cuda"
        key = (width, rows // 3, qp, host)
        try:
            session = self._budget.acquire(
                self._gpu, key, lambda: _open_encoder(self._nvc, self._gpu, width, rows // 3, qp, host))
        except CodecError:
            raise
        except Exception as exc:  # noqa: BLE001 - a session that cannot open (table full, a refused size)
            raise CodecError(f"NVENC could not open a session: {_one_line(exc)}") from None  # falls back
        error = None
        try:
            packets = []
            for i in range(count):
                # Each frame object lives until its Encode returns: the binding copies from it then.
                frame = frames[i].numpy() if host else DeviceFrame(frames[i])
                packets += session.Encode(frame)
            packets += session.EndEncode()
            if len(packets) != count or not all(isinstance(p, dict) and "data" in p for p in packets):
                kinds = {type(p).__name__ for p in packets}
                error = (f"NVENC returned {len(packets)} packets ({', '.join(sorted(kinds)) or 'none'}) for {count} "
                         f"all-intra frames; PyNvVideoCodec {SUPPORTED_SERIES}x returns one dict per frame")
            else:
                out = [bytes(p["data"]) for p in packets]
        except Exception as exc:  # noqa: BLE001 - turned into a message; the exception is not kept
            error = f"NVENC could not encode a frame: {_one_line(exc)}"
        if error is not None:
            # Drop our only reference before raising: no traceback may keep the session open.
            session = None
            self._budget.discard(self._gpu)
            raise CodecError(error)
        self._budget.release(self._gpu, key, session)
        return out

    @property
    def gpu(self) -> int:
        """The CUDA ordinal whose NVENC this encoder uses (0 for host frames)."""
        return self._gpu

    def encode(self, frames: torch.Tensor, qp: int | None) -> list[bytes]:
        """Encode ``[F, 3H, W]`` uint8 frames; contiguous runs of them go to the session threads."""
        if frames.device.type == "cuda":
            frames = frames.to(self._device).contiguous()
            # NVENC copies on its own stream: finish the kernels that wrote the frames first.
            torch.cuda.current_stream(frames.device).synchronize()
        else:
            frames = frames.contiguous()
        count = frames.shape[0]
        runs = min(self._workers, count)
        bounds = [count * r // runs for r in range(runs + 1)]
        try:
            futures = [self._threads.submit(self._encode_run, frames[bounds[r]:bounds[r + 1]], qp)
                       for r in range(runs)]
        except RuntimeError:  # closed by another thread (NVENC retired after a failure)
            raise CodecError("NVENC on this device was retired after a failure") from None
        out, errors = [], []
        for future in futures:
            try:
                out += future.result()
            except CodecError as exc:
                errors.append(str(exc))
        if errors:
            raise CodecError(errors[0])
        return out

    def close(self) -> None:
        """Stop the session threads and close this GPU's idle sessions."""
        self._threads.shutdown(wait=True)
        self._budget.close_idle(self._gpu)


class NvDecoder:
    """NVDEC HEVC 4:4:4 decoder into ``[F, 3H, W]`` uint8 CUDA tensors, several sessions in parallel."""

    name = "nvdec"

    def __init__(self, device: torch.device, sessions: int = 4) -> None:
        self._nvc = import_nvc()
        self._device = device
        self._gpu = gpu_of(device)
        self._pool = _DecoderPool()
        self._threads = ThreadPoolExecutor(max(1, sessions), thread_name_prefix="nvdec")

    def _open(self, width: int, height: int):
        nvc = self._nvc
        stream = torch.cuda.Stream(self._device)
        dec = nvc.CreateDecoder(
            gpuid=self._gpu,
            codec=nvc.cudaVideoCodec.HEVC,
            cudastream=stream.cuda_stream,
            usedevicememory=True,
            maxwidth=width,
            maxheight=height,
            latency=nvc.DisplayDecodeLatencyType.ZERO,
        )
        return dec, stream

    def _decode_one(self, bitstream, slot: torch.Tensor, crc: int | None, index: int) -> None:
        if crc is not None:
            check_crc(bitstream, crc, index)
        nvc = self._nvc
        width, height = slot.shape[1], slot.shape[0] // 3
        key = (width, height)
        dec, stream = self._pool.acquire(key, lambda: self._open(width, height))
        error, reusable = None, False
        try:
            data = np.frombuffer(bitstream, dtype=np.uint8)
            packet = nvc.PacketData()
            packet.bsl_data = data.ctypes.data
            packet.bsl = data.size
            packet.decode_flag = int(nvc.VideoPacketFlag.ENDOFPICTURE)
            frames = list(dec.Decode(packet))
            reusable = True
            if not frames:  # only if the session holds pictures back; the flush ends its stream
                frames = list(dec.Decode(nvc.PacketData()))
                reusable = False
            if len(frames) != 1:
                raise CodecError(f"NVDEC returned {len(frames)} pictures for one frame: truncated or corrupt stream")
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                view = torch.from_dlpack(frames[0])
                if tuple(view.shape) != tuple(slot.shape):
                    raise CodecError(
                        f"NVDEC picture has shape {tuple(view.shape)}; expected {tuple(slot.shape)} (HEVC 4:4:4 8-bit)"
                    )
                slot.copy_(view)  # NVDEC reuses its surfaces: copy out before the next Decode
            del view, frames
            stream.synchronize()
        except CodecError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - PyNvVCException and friends
            error = f"NVDEC could not decode the HEVC stream: {_one_line(exc)}"
        if error is not None:
            # A failed session is dropped; no kept exception may hold it (or its surfaces) open.
            dec = stream = None
            raise CodecError(error)
        if reusable:
            self._pool.release(key, (dec, stream))

    def submit(self, bitstreams: Sequence, width: int, height: int, crcs: Sequence[int] | None = None) -> PendingFrames:
        """Start decoding ``bitstreams`` (one frame each) on the session threads; each frame's CRC-32
        (when given) is checked on its thread before the frame reaches NVDEC."""
        out = torch.empty((len(bitstreams), 3 * height, width), dtype=torch.uint8, device=self._device)
        futures = [self._threads.submit(self._decode_one, b, out[i], None if crcs is None else crcs[i], i)
                   for i, b in enumerate(bitstreams)]
        return PendingFrames(out, futures)

    def decode(self, bitstreams: Sequence, width: int, height: int, device: torch.device) -> torch.Tensor:
        out = self.submit(bitstreams, width, height).result()
        return out if out.device == device else out.to(device)
