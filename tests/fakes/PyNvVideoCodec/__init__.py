"""FAKE PyNvVideoCodec 2.2.4: the encoder half of NVIDIA's binding, for machines without NVENC.

It stands in for the NVENC silicon only. Everything a caller can get wrong is modelled on what the
real 2.2.4 wheel does (see docs/nvenc.md for the evidence: the wheel's ``__init__.py``,
``samples/utils/Utils.py`` and the strings and sources of ``PyNvVideoCodec_130.so``):

- ``CreateEncoder`` is the wheel's own Python wrapper, verbatim in behaviour: ``cudacontext`` and
  ``cudastream`` are popped, every other option is turned into a string (brackets stripped) and
  handed to ``PyNvEncoder(width, height, fmt, context, stream, usecpuinputbuffer, options)``.
- ``PyNvEncoder.__init__`` first queries the caps (``PyNvEncoderCaps``, which opens and closes a
  session of its own), rejects ``YUV444`` where the GPU lacks it, then opens its session.
- ``Encode(frame)``: if ``hasattr(frame, "cuda")`` it calls ``frame.cuda()``; if *that* has
  ``__dlpack__`` it is called with the stream **positionally** (so a torch tensor raises torch's
  TypeError), otherwise ``[0]``, ``[1]``, ``[2]`` must be planes with ``__cuda_array_interface__``
  of shape ``(H, W, 1)``, strides ``(W, 1, 1)`` or None, typestr ``|u1``, on the session's GPU,
  U after Y and V after U. Without ``cuda`` the frame must be host memory and the session must
  have been created with ``usecpuinputbuffer=True`` ("incorrect usage of CPU inut buffer").
- The Video Codec SDK's ``NvEncoder`` keeps an output delay of 3 frames: ``Encode`` returns no
  packet for the first three frames after a flush; ``EndEncode`` drains. Packets are lists of dicts
  ``{"data": bytes, "timestamp": int, "picture_type": int}``.
- A GeForce system allows 8 sessions across every process and card: the 9th
  ``nvEncOpenEncodeSessionEx`` returns NV_ENC_ERR_OUT_OF_MEMORY (10). A session ends only when the
  encoder object is destroyed (no close method), which is how a kept reference leaks one.

Stricter than the real one, on purpose (each would be a silent misconfiguration there): unknown
option names and values are refused, and only the all-intra HEVC 4:4:4 configuration flux-mesh
uses is encoded (through libx265 via PyAV, so the bitstreams are real HEVC any decoder reads).

Test controls live in :data:`FAKE` (mode, other programs' sessions, injected failures, whether the
plane pointers are host memory). On a machine with CUDA and ``FAKE.host_pointers`` false the planes
are read as real device memory, on the device the pointer belongs to.
"""

from __future__ import annotations

import ctypes
import fractions
import threading
import weakref

import numpy as np

__version__ = "2.2.4"

SYSTEM_SESSION_LIMIT = 8  # GeForce: every process and card together
OUTPUT_DELAY = 3  # NvEncoderCuda's default nExtraOutputDelay with frameIntervalP 1, no lookahead

NV_ENC_ERR_NO_ENCODE_DEVICE = 1
NV_ENC_ERR_UNSUPPORTED_DEVICE = 2
NV_ENC_ERR_INVALID_PARAM = 8
NV_ENC_ERR_OUT_OF_MEMORY = 10
NV_ENC_ERR_INVALID_VERSION = 15
NV_ENC_ERR_GENERIC = 20

_SDK = "/project/src/VideoCodecSDKUtils/helper_classes/NvCodec/NvEncoder/NvEncoder_130.cpp"
_OPEN_CALL = "m_nvenc.nvEncOpenEncodeSessionEx(&encodeSessionExParams, &hEncoder)"
_ENCODE_CALL = "m_nvenc.nvEncEncodePicture(m_hEncoder, &picParams)"

# NvEncoderClInterface's names plus the ones PyNvEncoder itself reads (gpu_id, fmt, s, ...).
KNOWN_OPTIONS = frozenset({
    "gpu_id", "codec", "preset", "tuning_info", "profile", "max_res", "s", "fps", "bf", "gop", "bitrate",
    "multipass", "ldkfs", "maxbitrate", "vbvbufsize", "vbvinit", "cq", "rc", "initqp", "qmin", "qmax",
    "constqp", "temporalaq", "lookahead", "aq", "fmt", "idrperiod", "numrefl0", "numrefl1", "repeatspspps",
    "level", "tier", "num_unit_in_ticks", "timescale", "slice_mode", "slice_data", "use_ivf_container",
})
_VALUES = {
    "codec": {"h264", "hevc", "av1"},
    "preset": {f"P{i}" for i in range(1, 8)},
    "tuning_info": {"high_quality", "low_latency", "ultra_low_latency", "lossless", "uhq"},
    "rc": {"constqp", "vbr", "cbr"},
}


class PyNvVCException(Exception):
    """The binding's generic error (its text carries ``returned error N`` for NVENC API failures)."""


class PyNvVCExceptionUnsupported(Exception):
    """The binding's "unsupported" error (formats the GPU cannot encode)."""


class FakeState:
    """What the fake silicon is and does; tests set these fields."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        #: "geforce" (works), "h200" (error 2 on session open), "no-encode-device" (no libnvidia-encode),
        #: "no-444" (the GPU cannot encode YUV444), "old-driver" (NvEncodeAPI version too new for it)
        self.mode = "geforce"
        self.other_sessions = 0  # held by other programs (OBS, a browser, Discord...)
        self.engines = 2
        self.fail_encodes_after: int | None = None  # Encode calls that succeed before one raises
        self.encodes = 0
        self.host_pointers = False  # plane pointers are host memory (CI without CUDA)
        self.sessions_opened = 0
        self.peak_sessions = 0
        #: Called on the destroying thread as each open session is destroyed (the real destructor's
        #: nvEncDestroyEncoder takes milliseconds: a test checks what the caller holds meanwhile).
        self.on_destroy = None
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    @property
    def open_sessions(self) -> int:
        """Sessions this process holds now (encoders not yet destroyed)."""
        with self._lock:
            return len(self._live)

    def _open(self, owner, where: str) -> None:
        if self.mode == "no-encode-device":
            raise PyNvVCException("NVENC library file is not found. Please ensure NV driver is installed")
        if self.mode == "old-driver":
            raise PyNvVCException("Current Driver Version does not support this NvEncodeAPI version, please "
                                  "upgrade driver")
        if self.mode == "h200":
            raise PyNvVCException(_api_error(where, _OPEN_CALL, NV_ENC_ERR_UNSUPPORTED_DEVICE))
        with self._lock:
            if len(self._live) + self.other_sessions >= SYSTEM_SESSION_LIMIT:
                raise PyNvVCException(_api_error(where, _OPEN_CALL, NV_ENC_ERR_OUT_OF_MEMORY))
            self._live.add(owner)
            self.sessions_opened += 1
            self.peak_sessions = max(self.peak_sessions, len(self._live))

    def _close(self, owner) -> bool:
        """Forget ``owner``'s session; True if it had one open."""
        with self._lock:
            was_open = owner in self._live
            self._live.discard(owner)
            return was_open


FAKE = FakeState()


def _api_error(function: str, call: str, code: int) -> str:
    # NVENCException::makeNVENCException: "<function> : <call> returned error <code> at <file>:<line>".
    # The binding's exception text is several lines; on the H200 its first line was only
    # "PyNvEncoderCaps :", the status on the next: a reader of the first line alone misses the code.
    return f"{function} :\n{call} returned error {code} at {_SDK}:{300 + code}"


class _Probe:
    """The transient session PyNvEncoderCaps opens to read the caps (it counts toward the limit)."""


def _caps() -> dict:
    probe = _Probe()
    FAKE._open(probe, "PyNvEncoderCaps")
    FAKE._close(probe)
    return {"num_encoder_engines": FAKE.engines, "support_yuv444_encode": int(FAKE.mode != "no-444"),
            "support_lossless_encode": 1, "support_10bit_encode": 1, "width_max": 8192, "height_max": 8192}


def GetEncoderCaps(gpuid: int = 0, codec: str = "h264") -> dict:  # noqa: N802 - the binding's name
    """Encoder caps of the GPU (the real one always queries GPU 0, whatever ``gpuid`` says)."""
    if codec not in ("h264", "hevc", "av1"):
        return {}
    return _caps()


def _tostring(val):
    if type(val) is dict:
        return {k: _tostring(v) for k, v in val.items()}
    return str(val).replace("]", "").replace("[", "")


def CreateEncoder(width, height, fmt, usecpuinputbuffer, **kwargs):  # noqa: N802 - the binding's name
    """The wheel's wrapper: options as strings, context and stream popped."""
    cudacontext = int(kwargs.pop("cudacontext", 0))
    cudastream = int(kwargs.pop("cudastream", 0))
    return PyNvEncoder(width, height, fmt, cudacontext, cudastream, usecpuinputbuffer, _tostring(kwargs))


class PyNvEncoder:
    """One NVENC session (fake): all-intra HEVC 4:4:4 8-bit through libx265."""

    def __init__(self, width, height, fmt, cudacontext, cudastream, usecpuinputbuffer, options) -> None:
        for key, value in options.items():
            if not isinstance(value, str):
                raise TypeError(f"PyNvEncoder options must map str to str; {key!r} is {type(value).__name__}")
        unknown = sorted(set(options) - KNOWN_OPTIONS)
        if unknown:  # the real binding ignores these silently; a typo must not pass here
            raise PyNvVCException(f"FAKE: unknown encoder option(s) {', '.join(unknown)}")
        for key, allowed in _VALUES.items():
            if key in options and options[key] not in allowed:
                raise PyNvVCException(f"FAKE: option {key}={options[key]!r} is not one of {sorted(allowed)}")
        self._gpu = int(options.get("gpu_id", "0"))
        caps = _caps()  # opens and closes a session first, as the real constructor does
        if fmt == "YUV444" and not caps["support_yuv444_encode"]:
            raise PyNvVCExceptionUnsupported("Format YUV444 is not supported by current encoder.\nSupported "
                                             "formats:\n- NV12, YUV420, ARGB, ABGR (always supported)\n")
        if fmt != "YUV444":
            raise PyNvVCException(f"FAKE: only YUV444 is modelled, not {fmt!r}")
        if options.get("codec") != "hevc":
            raise PyNvVCException("FAKE: only codec=hevc is modelled")
        intra = {"gop": "1", "idrperiod": "1", "bf": "0", "repeatspspps": "1"}
        if any(options.get(k) != v for k, v in intra.items()):
            raise PyNvVCException(f"FAKE: only all-intra streams with repeated headers are modelled ({intra})")
        if options.get("tuning_info") == "lossless":
            self._rate = "lossless=1"
        elif options.get("rc") == "constqp" and options.get("constqp", "").isdigit():
            self._rate = f"qp={int(options['constqp'])}"
        else:
            raise PyNvVCException("FAKE: use tuning_info=lossless, or rc=constqp with constqp=N")
        if not 0 < width <= caps["width_max"] or not 0 < height <= caps["height_max"]:
            raise PyNvVCException(f"NvEncoder : Invalid encoder width and height at {_SDK}:200")
        FAKE._open(self, "NvEncoder")
        import av  # noqa: PLC0415 - PyAV is a flux-mesh dependency

        self._av = av
        ctx = av.CodecContext.create("libx265", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv444p"
        ctx.time_base = fractions.Fraction(1, 30)
        ctx.options = {"x265-params": f"{self._rate}:keyint=1:min-keyint=1:bframes=0:repeat-headers=1:info=0:"
                                      "log-level=error", "preset": "ultrafast", "tune": "zerolatency"}
        self._ctx = ctx
        self._width, self._height = width, height
        self._cpu_input = bool(usecpuinputbuffer)
        self._queue: list[tuple[int, bytes]] = []
        self._frame_num = 0

    def __del__(self) -> None:
        if FAKE._close(self) and FAKE.on_destroy is not None:
            FAKE.on_destroy()

    # --- input, as GetEncoderInput / GetEncoderInputFromCPUBuffer read it -------------------------

    def _planes_from_device_frame(self, frame) -> np.ndarray:
        if hasattr(frame, "__dlpack__"):
            if hasattr(frame, "__dlpack_device__"):
                device_type = frame.__dlpack_device__()[0]
                if int(device_type) not in (2, 3, 13):  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
                    raise PyNvVCException("Only CUDA-accessible memory buffers can be wrapped")
            frame.__dlpack__(0)  # consumer stream, positionally: torch>=2.9 raises TypeError here
            raise PyNvVCException("FAKE: DLPack input is not modelled past the call the binding makes")
        views = [self._plane(frame.__getitem__(i), i) for i in range(3)]
        (y, _), (u, _), (v, _) = views
        if u <= y or v <= u:
            raise PyNvVCException("Incorrect surface allocation. u and v plane must follow yplane.")
        return np.stack([data for _, data in views])

    def _plane(self, plane, index: int) -> tuple[int, np.ndarray]:
        if not hasattr(plane, "__cuda_array_interface__"):
            raise RuntimeError("Could not encode CUDA array! Array has no attribute __cuda_array_interface__")
        cai = plane.__cuda_array_interface__
        ptr, _read_only = cai["data"]
        shape, typestr = list(cai["shape"]), cai["typestr"]
        if typestr not in ("|u1", "B"):
            raise RuntimeError(f"Could not encode CUDA array! Invalid typstr: {typestr}")
        expected = [self._height, self._width, 1]
        if shape != expected:
            raise RuntimeError(f"Invalid shape: {shape}, expected: {expected}")
        if cai.get("strides") is not None and list(cai["strides"]) != [self._width, 1, 1]:
            raise RuntimeError(f"Invalid strides: {list(cai['strides'])}, expected: {[self._width, 1, 1]}")
        size = self._width * self._height
        if FAKE.host_pointers:
            data = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(int(ptr))).copy()
        else:
            data = _read_device(int(ptr), size, self._gpu)
        return int(ptr), data.reshape(self._height, self._width)

    def _planes_from_host(self, frame) -> np.ndarray:
        array = np.ascontiguousarray(frame, dtype=np.uint8)  # py::array_t<uint8_t, c_style | forcecast>
        if array.size != 3 * self._width * self._height:  # the real one reads past a short buffer
            raise PyNvVCException(f"FAKE: host frame of {array.size} bytes; a {self._width}x{self._height} "
                                  f"YUV444 frame has {3 * self._width * self._height}")
        return array.reshape(3, self._height, self._width)

    # --- the binding's methods ----------------------------------------------------------------------

    def Encode(self, frame, *args) -> list:  # noqa: N802 - the binding's name
        """Encode one frame; returns the packets the output delay lets out (often none)."""
        if hasattr(frame, "cuda"):
            planes = self._planes_from_device_frame(frame.cuda())
        else:
            if not self._cpu_input:
                raise PyNvVCException("incorrect usage of CPU inut buffer")
            planes = self._planes_from_host(frame)
        if FAKE.fail_encodes_after is not None and FAKE.encodes >= FAKE.fail_encodes_after:
            raise PyNvVCException(f"NvEncoder : {_ENCODE_CALL} returned error {NV_ENC_ERR_GENERIC} at {_SDK}:700")
        FAKE.encodes += 1
        video = self._av.VideoFrame.from_ndarray(planes, format="yuv444p")
        video.pts = self._frame_num
        packets = self._ctx.encode(video)
        if len(packets) != 1:
            raise PyNvVCException(f"FAKE: libx265 returned {len(packets)} packets for one frame")
        self._queue.append((self._frame_num, bytes(packets[0])))
        self._frame_num += 1
        out = []
        while len(self._queue) > OUTPUT_DELAY:
            out.append(self._packet(*self._queue.pop(0)))
        return out

    def EndEncode(self) -> list:  # noqa: N802 - the binding's name
        """Flush: every queued frame's packet (the session takes new frames afterwards)."""
        out = [self._packet(*item) for item in self._queue]
        self._queue.clear()
        return out

    @staticmethod
    def _packet(timestamp: int, data: bytes) -> dict:
        return {"data": data, "timestamp": timestamp, "picture_type": 3}  # NV_ENC_PIC_TYPE_IDR


def _read_device(ptr: int, size: int, gpu: int) -> np.ndarray:
    """Copy ``size`` bytes at device pointer ``ptr`` to the host, refusing a pointer of another GPU."""
    import torch  # noqa: PLC0415 - only on a machine with CUDA

    class _View:  # read-only would be truthful, but torch.as_tensor refuses the flag (seen on the H200)
        __cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3}

    view = torch.as_tensor(_View())  # no device argument: the tensor lands on the pointer's own GPU
    if view.device.index != gpu:
        raise PyNvVCException(f"Gpu id {view.device.index} doesnt match with cuda context device {gpu}")
    return view.cpu().numpy()


# --- the decoder half: the real binding's, where one is installed ----------------------------------
# Only NVENC is faked. On a GPU machine with the real wheel (the H200: NVDEC yes, NVENC no) the
# decoder names below come from its compiled module, so NVDEC really decodes the fake's streams.
_DECODER_NAMES = frozenset({"CreateDecoder", "PacketData", "cudaVideoCodec", "cudaVideoChromaFormat",
                            "VideoPacketFlag", "DisplayDecodeLatencyType", "GetDecoderCaps"})
_real = None
_real_error = "no real PyNvVideoCodec is installed beside the fake"


def _load_real():
    """The real wheel's compiled module (loaded the way its own __init__ loads it), or None."""
    import importlib.machinery  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    global _real_error
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("PyNvVideoCodec", path)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    for suffix in ("_130", "_121"):
        for name in os.listdir(folder):
            if name.startswith(f"PyNvVideoCodec{suffix}.cpython-{tag}") and name.endswith(".so"):
                try:
                    real_spec = importlib.util.spec_from_file_location("_PyNvVideoCodec", os.path.join(folder, name))
                    module = importlib.util.module_from_spec(real_spec)
                    real_spec.loader.exec_module(module)
                    return module
                except Exception as exc:  # noqa: BLE001 - reported by __getattr__
                    _real_error = f"the real PyNvVideoCodec in {folder} does not load: {exc}"
    return None


def __getattr__(name: str):
    global _real
    if name in _DECODER_NAMES:
        if _real is None:
            _real = _load_real()
        if _real is None:
            raise AttributeError(f"FAKE PyNvVideoCodec has no {name}: {_real_error}")
        return getattr(_real, name)
    raise AttributeError(f"module 'PyNvVideoCodec' (FAKE) has no attribute {name!r}")
