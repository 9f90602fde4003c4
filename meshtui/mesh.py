"""The client side of a mesh, without any UI: find the peers, plan the split, load the spans,
run generations. ``meshtui generate`` and the dashboard both drive this.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meshd.connection import Channel
from meshd.errors import MeshError
from meshd.link import LinkEmulation
from meshd.model.presets import PRESETS, ModelPreset
from meshd.plan import PeerAddress, PeerResources, PlanError, SplitPlan, parse_split, propose

EventFn = Callable[[dict], Awaitable[None] | None]


@dataclass
class Peer:
    label: str
    address: PeerAddress
    channel: Channel | None = None
    info: dict | None = None
    error: str | None = None
    error_code: str | None = None  # the MeshError code: "auth" (wrong key) vs "peer-lost" (unreachable)...
    links: list = field(default_factory=list)  # the daemon's per-peer link counters from its last info
    rtt_ms: float | None = None
    seen: float = 0.0

    @property
    def name(self) -> str:
        return (self.info or {}).get("name") or str(self.address)

    @property
    def online(self) -> bool:
        return self.channel is not None and self.channel.alive and self.info is not None


@dataclass
class GenerationOutcome:
    png: bytes
    summary: dict
    events: list = field(default_factory=list)
    latents: object = None  # final latents (torch tensor) when asked for


def labels(n: int) -> list[str]:
    letters = string.ascii_uppercase
    return [letters[i] if i < 26 else f"P{i}" for i in range(n)]


async def _call(callback: EventFn | None, event: dict) -> None:
    if callback is None:
        return
    result = callback(event)
    if asyncio.iscoroutine(result):
        await result


class Mesh:
    """Peers by label (A, B, ... in the order given), authenticated with the cluster key."""

    def __init__(self, key: bytes | None, emulation: LinkEmulation | None = None) -> None:
        self.key = key
        self.emulation = emulation
        self.peers: dict[str, Peer] = {}

    def add(self, address: PeerAddress, label: str | None = None) -> Peer:
        for peer in self.peers.values():
            if peer.address == address:
                return peer
        # The first free label: after a removal, len(peers) + 1 may name a peer that is still here.
        label = label or next(x for x in labels(len(self.peers) + 1) if x not in self.peers)
        peer = Peer(label, address)
        self.peers[label] = peer
        return peer

    async def remove(self, label: str) -> None:
        peer = self.peers.pop(label, None)
        if peer and peer.channel:
            await peer.channel.close()

    async def connect(self, peer: Peer, timeout: float = 10) -> Peer:
        """(Re)connect, authenticate and read the peer's info; errors are kept on the peer."""
        try:
            if peer.channel is None or not peer.channel.alive:
                if peer.channel is not None:
                    await peer.channel.close()
                peer.channel = await Channel.connect(peer.address.host, peer.address.port, self.key,
                                                     emulation=self.emulation, hello={"node": "meshtui"})
            t0 = time.perf_counter()
            reply = await peer.channel.request("info", timeout=timeout)
            peer.rtt_ms = (time.perf_counter() - t0) * 1e3
            peer.info = reply.header.get("node") or {}
            peer.links = reply.header.get("links") if isinstance(reply.header.get("links"), list) else []
            peer.error = peer.error_code = None
            peer.seen = time.time()
        except MeshError as exc:
            peer.error, peer.error_code = exc.message, exc.code
            peer.info = None
        return peer

    async def connect_all(self) -> list[Peer]:
        await asyncio.gather(*(self.connect(p) for p in self.peers.values()))
        return list(self.peers.values())

    def require_online(self) -> list[Peer]:
        down = [p for p in self.peers.values() if not p.online]
        if down:
            raise MeshError("peer-lost", "; ".join(f"{p.label} {p.address}: {p.error or 'offline'}" for p in down))
        return list(self.peers.values())

    def model(self) -> tuple[ModelPreset, dict]:
        """The model every peer serves (they must agree on preset, hash and dtype)."""
        peers = self.require_online()
        identities = {(p.info["model"]["preset"], p.info["model"]["hash"], p.info["model"]["dtype"]): p for p in peers}
        if len(identities) != 1:
            detail = "; ".join(f"{p.label} serves {p.info['model']['model_id']} ({preset}, {dtype}, sha256 {h[:12]})"
                               for (preset, h, dtype), p in identities.items())
            raise MeshError("mismatch", f"peers serve different models: {detail}")
        (preset_name, _, _), first = next(iter(identities.items()))
        return PRESETS[preset_name], first.info["model"]

    def plan(self, split: str, tokens: int) -> SplitPlan:
        """``auto`` (every peer, balanced, within free memory) or a SPEC like ``A:0-15,B:16-31``."""
        preset, _ = self.model()
        peers = list(self.peers.values())
        if split == "auto":
            resources = []
            for p in peers:
                memory = p.info.get("memory") or {}
                # Memory already holding blocks counts as available for this plan's blocks.
                free = int(memory.get("free", 0)) + sum(preset.block_params(i) * 2 for a, b in p.info.get("blocks", [])
                                                      for i in range(a, b))
                resources.append(PeerResources(p.address, p.label, free))
            return propose(preset, resources, tokens)
        return parse_split(split, {p.label: p.address for p in peers}, preset.num_blocks)

    def peer_at(self, address: PeerAddress) -> Peer:
        for p in self.peers.values():
            if p.address == address:
                return p
        raise PlanError(f"plan names {address}, which is not a known peer")

    async def apply(self, plan: SplitPlan, on_event: EventFn | None = None) -> None:
        """Make every stage's peer hold exactly its blocks (loading with progress where needed)."""
        wanted: dict[str, set[int]] = {}
        for stage in plan.stages:
            wanted.setdefault(self.peer_at(stage.peer).label, set()).update(range(stage.start, stage.end))

        async def load(label: str, blocks: set[int]) -> None:
            peer = self.peers[label]
            held = {i for a, b in peer.info.get("blocks", []) for i in range(a, b)}
            if held == blocks:
                return
            ranges = []
            for i in sorted(blocks):
                if ranges and ranges[-1][1] == i:
                    ranges[-1][1] = i + 1
                else:
                    ranges.append([i, i + 1])
            await _call(on_event, {"kind": "load-start", "peer": label, "blocks": ranges})

            async def progress(frame) -> None:
                await _call(on_event, {"peer": label, **frame.header, "kind": "load"})

            reply = await peer.channel.request("load", {"blocks": ranges}, on_event=progress, timeout=3600)
            peer.info = reply.header.get("node") or peer.info
            await _call(on_event, {"kind": "load-done", "peer": label, "seconds": reply.header.get("seconds")})

        await asyncio.gather(*(load(label, blocks) for label, blocks in wanted.items()))

    async def generate(self, plan: SplitPlan, params: dict, *, codec: str = "auto", quality_floor: float | None = None,
                       measure_error: bool = True, return_latents: bool = False,
                       on_event: EventFn | None = None) -> GenerationOutcome:
        """Run one generation on the plan's head; events (queued, prepared, step, decode) stream to ``on_event``."""
        head = self.peer_at(plan.stages[0].peer)
        if not head.online:
            await self.connect(head)
            self.require_online()
        events: list[dict] = []

        async def handle(frame) -> None:
            event = {k: v for k, v in frame.header.items() if k not in ("op", "id")}
            events.append(event)
            await _call(on_event, event)

        fields = {"params": params, "plan": plan.to_wire(), "codec": codec, "measure_error": measure_error,
                  "return_latents": return_latents}
        if quality_floor is not None:
            fields["quality_floor"] = quality_floor
        reply = await head.channel.request("generate", fields, on_event=handle, timeout=None)
        if len(reply.segments) != (2 if return_latents else 1):
            raise MeshError("protocol", "generate reply must carry the PNG (and the latents if asked)", peer=head.name)
        latents = None
        if return_latents:
            from meshd.streaming import unpack_raw  # noqa: PLC0415
            import torch  # noqa: PLC0415

            (latents,) = unpack_raw([reply.header.get("latents")], reply.segments[1:], torch.device("cpu"))
        return GenerationOutcome(bytes(reply.segments[0]), reply.header.get("summary") or {}, events, latents)

    async def close(self) -> None:
        for peer in self.peers.values():
            if peer.channel is not None:
                with contextlib.suppress(Exception):
                    await peer.channel.close()
                peer.channel = None
