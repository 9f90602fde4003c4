"""One hop of the pipeline, the same code at both of its ends.

A generation's stream leaves the head, passes through every stage and comes back as the prediction.
Whichever node sends (the head, or a stage with a next one), the hop is the same: the link to the next
stage chosen once per job (CUDA IPC when both are GPUs of this host and mapping works, else the codec
the policy picks from the measured bandwidth), the ``prepare`` passed on down the line, and each step's
activation sent with the per-step vectors the stages after it need, the reply's hop records checked
and learned from. :class:`Relay` is that, for one node; the head (:mod:`.head`) and the stages
(:mod:`.stage`) both use it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

import codec
from codec import Calibration, Capabilities, CodecSpec, TokenLayout, choose_codec

from .. import limits
from ..errors import MeshError
from ..fields import wire_bool, wire_int, wire_number
from ..model.span import Conditioning
from ..wire import ipc
from ..wire.shm import ShmSender
from .plan import Stage
from .streaming import LinkPlan, SendStats, SharedRun, link_after, pack_raw, send_activation

log = logging.getLogger(__name__)

def cond_needs(preset, start: int, end: int) -> set[str]:
    """Which per-step vectors blocks ``[start, end)`` (and, at the end, the final layer) use."""
    needs = set()
    if start < preset.num_double:
        needs |= {"mod_img", "mod_txt"}
    if end > preset.num_double:
        needs.add("mod_single")
    if end == preset.num_blocks:
        needs.add("temb")
    return needs


@dataclass
class Geometry:
    batch: int
    txt_len: int
    img_h: int
    img_w: int

    @property
    def tokens(self) -> int:
        return self.txt_len + self.img_h * self.img_w

    def stream_bytes(self, hidden: int, dtype: torch.dtype) -> int:
        """The size of one step's stream between stages (batch x tokens x hidden)."""
        return self.batch * self.tokens * hidden * dtype.itemsize

    @property
    def layout(self) -> TokenLayout:
        """Where the text and image tokens sit in the stream (what the codecs tile by)."""
        return TokenLayout(self.txt_len, self.img_h, self.img_w)

    def to_wire(self) -> dict:
        return {"batch": self.batch, "txt_len": self.txt_len, "img_h": self.img_h, "img_w": self.img_w}

    @classmethod
    def from_wire(cls, data: object) -> Geometry:
        if not isinstance(data, dict):
            raise MeshError("bad-request", "geometry must be a map")
        values = {}
        for name, hi in (("batch", limits.MAX_BATCH), ("txt_len", limits.MAX_TEXT_TOKENS), ("img_h", limits.MAX_GRID),
                         ("img_w", limits.MAX_GRID)):
            v = wire_int(data.get(name))
            if v is None or not 1 <= v <= hi:
                raise MeshError("bad-request", f"geometry {name}={data.get(name)!r:.20} must be in 1..{hi}")
            values[name] = v
        return cls(**values)


def quality_floor(header: dict, default: float) -> float:
    """A request's ``quality_floor``, the smallest cosine a hop's codec may give (absent: this daemon's
    configured ``default``): a number in [0, 1]. The one check of it, made where a request comes in: by the
    head for the client's, by each stage for its prepare's (which any key holder may send)."""
    value = header.get("quality_floor", default)
    floor = wire_number(value)
    if floor is None or not 0 <= floor <= 1:
        raise MeshError("bad-request", f"quality_floor={value!r:.20} must be a number in [0, 1]")
    return floor


def request_flag(header: dict, name: str, default: bool) -> bool:
    """A request's true/false field ``name`` (absent: ``default``); any other value is refused, so that
    a text "false" (truthy) cannot turn an option on."""
    value = header.get(name, default)
    if wire_bool(value) is None:
        raise MeshError("bad-request", f"{name}={value!r:.20} must be true or false")
    return value


def downstream_needs(preset, stages) -> set[str]:
    """The per-step vectors the stages after a sender use (what it must pass on with the stream)."""
    return set().union(*(cond_needs(preset, s.start, s.end) for s in stages))


def relay_compile_events(send: Callable[[dict], Awaitable[None]]) -> Callable:
    """An ``on_event`` for a downstream prepare: its stages' compile events go on up the line."""
    async def relay(frame) -> None:
        if frame.header.get("kind") in ("compiling", "compiled"):
            await send({k: v for k, v in frame.header.items() if k not in ("op", "id")})
    return relay


class Relay:
    """This node's end of the hops it sends: choosing their links, preparing and feeding the next stage.

    ``daemon`` is the node (its peer pool, device, capabilities, model and name). Per next peer
    ("host:port") it keeps the codec figures learned from the hops sent there: the policy decides with
    them, so it follows what this link and these GPUs really do."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.calibrations: dict[str, Calibration] = {}
        self._ipc_ok: dict[str, bool] = {}
        self._shm: dict[str, ShmSender] = {}  # per next peer: the region it gave us, or why not

    def close(self) -> None:
        """The daemon stops: the shared regions it was given go (unregistered once no send uses them)."""
        for sender in self._shm.values():
            sender.close()

    def stage_info(self, stage: Stage, link: LinkPlan | None) -> dict:
        """What a prepare reply says of this node's stage (the dashboard and the summary show it)."""
        d = self.daemon
        return {"peer": str(stage.peer), "node": d.name, "node_id": d.node_id, "blocks": [stage.start, stage.end],
                "caps": d.caps.to_dict(), "device": str(d.device), "host_id": ipc.host_id(),
                "codec_out": link.label if link else None, "link": link.info if link else None}

    async def prepare_next(self, fields: dict, segments: list, stages: list[Stage], events) -> tuple[object, list]:
        """Send ``prepare`` to ``stages[0]`` for the stages from there on; returns (channel, their infos).
        Their compile events go on to ``events`` (the request this prepare serves), when given."""
        channel = await self.daemon.pool.get(stages[0].peer)
        reply = await channel.request("prepare", {**fields, "stages": [s.to_wire() for s in stages]}, segments,
                                      on_event=relay_compile_events(events) if events else None,
                                      timeout=limits.PREPARE_TIMEOUT_S)
        infos = reply.header.get("stages")
        if not isinstance(infos, list) or not infos or not isinstance(infos[0], dict):
            raise MeshError("protocol", "prepare reply lacks stage infos", peer=channel.name)
        return channel, infos

    async def send_step(self, channel, link: LinkPlan, job: str, step: object, names: list[str],
                        vectors: list[torch.Tensor], stream: torch.Tensor, *, measure_error: bool,
                        placed: SharedRun | None = None):
        """Send one step's ``stream`` (and the per-step ``vectors`` named ``names``) over ``link``; returns
        (reply, hop records with this hop's send figures folded into the first, the link for the next step).
        ``placed``: the run of the next stage's region the compute already wrote ``stream`` into."""
        headers, buffers = pack_raw(vectors)
        reply, sent = await send_activation(channel, {"job": job, "step": step, "cond": headers, "cond_names": names},
                                            buffers, stream, link, measure_error=measure_error, placed=placed)
        link = await link_after(link, sent)
        hops = reply.header.get("hops")
        if not isinstance(hops, list) or not hops or not isinstance(hops[0], dict):
            raise MeshError("protocol", "forward reply lacks hop records", peer=channel.name)
        self.learn_hop(link, sent, hops[0])
        hops[0].update(sent.to_dict())
        hops[0]["from"] = self.daemon.name
        return reply, hops, link

    @staticmethod
    def vectors(cond: Conditioning | dict, names: list[str]) -> list[torch.Tensor]:
        return [cond[n] if isinstance(cond, dict) else getattr(cond, n) for n in names]

    async def choose_link(self, nxt: Stage, next_info: dict, geometry: Geometry, forced: str,
                          floor: float) -> LinkPlan:
        """How this stage's output reaches ``nxt``: CUDA IPC when both are GPUs of this host and mapping
        the memory works (tried, not assumed); else, on one host, a shared host-memory region the next
        stage gives us (set up, not assumed); else the codec the policy picks from the measured
        bandwidth and both ends' capabilities (or the one the plan forces)."""
        d = self.daemon
        if forced in ("auto", "raw") and await self._ipc_works(nxt, next_info):  # a forced codec needs no probe
            return LinkPlan("cuda-ipc", None, {"to": str(nxt.peer), "transport": "cuda-ipc", "codec": "cuda-ipc",
                                              "why": "same host: the stream moves GPU to GPU, no TCP"})
        stream_bytes = geometry.stream_bytes(d.model.preset.hidden, d.model.dtype)
        if forced in ("auto", "raw") and (sender := await self._shm_works(nxt, next_info, stream_bytes)):
            raw = CodecSpec("raw", layout=geometry.layout)
            return LinkPlan("host-shm", raw, {"to": str(nxt.peer), "transport": "host-shm", "codec": "raw",
                                              "why": "same host without CUDA IPC: the stream crosses shared "
                                                     "host memory once, only its place goes over TCP"},
                            shm=sender)
        try:
            next_caps = Capabilities.from_dict(next_info.get("caps"))
        except ValueError as exc:
            raise MeshError("protocol", f"peer {nxt.peer} sent bad capabilities: {exc}") from None
        bandwidth = await d.pool.bandwidth(nxt.peer)
        try:
            choice = choose_codec(stream_bytes, bandwidth.bytes_per_s, d.caps, next_caps, quality_floor=floor,
                                  force=None if forced == "auto" else forced,
                                  calibration=self.calibrations.setdefault(str(nxt.peer), Calibration()))
        except codec.CodecError as exc:
            raise MeshError("mismatch", f"link {d.name} -> {nxt.peer}: {exc}") from None
        spec = CodecSpec(choice.spec.name, qp=choice.spec.qp,
                         layout=geometry.layout)
        return LinkPlan("tcp", spec, {"to": str(nxt.peer), "transport": "tcp", "bandwidth_bps": bandwidth.bytes_per_s,
                                      "rtt_ms": bandwidth.rtt_ms, "codec": spec.label, "why": choice.reason,
                                      "emulated": d.emulation.describe() if d.emulation else None},
                        receiver=next_caps, replan=lambda: self.choose_link(nxt, next_info, geometry, forced, floor))

    def learn_hop(self, link: LinkPlan, sent: SendStats, hop: dict) -> None:
        """Fold a hop this node sent over ``link`` (``hop``: the receiver's record) into the link's
        codec calibration: encode speed here, decode speed there, the ratio these activations got. The
        receiver's decode_ms counts only as a finite number (the calibration takes figures > 0 only)."""
        decode_ms = wire_number(hop.get("decode_ms"))
        if link.transport != "tcp" or decode_ms is None:
            return
        self.calibrations.setdefault(link.info["to"], Calibration()).observe_hop(
            sent.codec, self.daemon.caps, link.receiver, sent.raw_bytes, sent.wire_bytes, sent.encode_ms / 1e3,
            decode_ms / 1e3)

    async def _ipc_works(self, nxt: Stage, next_info: dict) -> bool:
        """Try the same-host path once per peer: the peer maps a probe tensor of ours and checks it."""
        d = self.daemon
        if d.device.type != "cuda" or d.emulation is not None or not d.config.same_host_ipc:
            return False
        if next_info.get("host_id") != ipc.host_id() or not str(next_info.get("device", "")).startswith("cuda"):
            return False
        key = str(nxt.peer)
        if key not in self._ipc_ok:
            probe = ipc.probe_tensor(d.device)
            torch.cuda.synchronize(d.device)
            try:
                channel = await d.pool.get(nxt.peer)
                reply = await channel.request("ipc-probe", {"ipc": ipc.export(probe)}, timeout=30)
                self._ipc_ok[key] = reply.header.get("ok") is True
            except MeshError as exc:
                log.info("same-host path to %s unavailable: %s", key, exc.message)
                self._ipc_ok[key] = False
            del probe
            ipc.collect()
        return self._ipc_ok[key]

    async def _shm_works(self, nxt: Stage, next_info: dict, stream_bytes: int) -> ShmSender | None:
        """The same-host fallback: the next stage, on this host, gives this connection a shared region
        (made once per connection; a setup that fails is logged and the link uses TCP until it is
        asked for again, after SHM_RETRY_S, doubling)."""
        d = self.daemon
        if d.emulation is not None or not d.config.same_host_shm:
            return None
        host = ipc.host_id()
        if not host or next_info.get("host_id") != host:
            return None
        key = str(nxt.peer)
        sender = self._shm.get(key)
        if sender is None:
            sender = self._shm[key] = ShmSender(key, d.device)
        channel = await d.pool.get(nxt.peer)
        return sender if await sender.arena(channel, stream_bytes, retry=True) is not None else None
