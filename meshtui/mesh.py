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

import torch

from meshd import limits
from meshd.config import ranges
from meshd.errors import RETRYABLE, MeshError, Mismatch, PeerLost, ProtocolViolation
from meshd.model.presets import ModelPreset
from meshd.node.info import NodeInfo, compute_difference
from meshd.pipeline.blocks import BlockRange
from meshd.pipeline.request import GenerationParams
from meshd.pipeline.peers import read_info
from meshd.pipeline.plan import PeerAddress, PlanError, SplitPlan, parse_split, same_host_links
from meshd.fields import wire_number
from meshd.pipeline.streaming import unpack_raw
from meshd.wire.channel import Channel
from meshd.wire.link import LinkEmulation

from . import events
from .events import Dropped, Event, LoadDone, LoadStarted, Replanned, Retry
from .splitting import BlockSpeeds, plan_preset, propose_plan, tokens_for
from .views import PeerView

EventFn = Callable[[Event], Awaitable[None] | None]


@dataclass
class Peer:
    label: str
    address: PeerAddress
    channel: Channel | None = None
    info: NodeInfo | None = None
    error: str | None = None
    failure: MeshError | None = None  # why the last connect failed: AuthRefused (wrong key), PeerLost...
    links: list = field(default_factory=list)  # the daemon's per-peer link counters from its last info
    rtt_ms: float | None = None
    seen: float = 0.0

    @property
    def name(self) -> str:
        return (self.info.name if self.info else None) or str(self.address)

    def view(self) -> PeerView:
        """How the planner and the screens see this peer (its last info, or connecting/failed)."""
        base = PeerView(self.label, self.address)
        if self.info is not None:
            return base.with_info(self.info, self.rtt_ms, now=self.seen)
        return base.failed(self.failure, self.error) if self.failure is not None else base

    @property
    def online(self) -> bool:
        return self.channel is not None and self.channel.alive and self.info is not None


@dataclass
class GenerationOutcome:
    png: bytes
    summary: dict  # as the head sent it (``meshtui generate --json`` prints it)
    events: list[Event] = field(default_factory=list)
    latents: object = None  # final latents (torch tensor) when asked for


def labels(n: int) -> list[str]:
    letters = string.ascii_uppercase
    return [letters[i] if i < 26 else f"P{i}" for i in range(n)]


async def _call(callback: EventFn | None, event: Event) -> None:
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
        self._replanning = asyncio.Lock()  # concurrent generations that lose a peer re-plan one at a time
        self._replanned: SplitPlan | None = None  # the last plan a re-plan made (see replan)

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

    async def connect(self, peer: Peer, timeout: float = limits.INFO_TIMEOUT_S) -> Peer:
        """(Re)connect, authenticate and read the peer's info; errors are kept on the peer."""
        try:
            if peer.channel is None or not peer.channel.alive:
                if peer.channel is not None:
                    await peer.channel.close()
                    peer.channel = None
                peer.channel = await Channel.connect(peer.address.host, peer.address.port, self.key,
                                                     emulation=self.emulation, hello={"node": "meshtui"})
            reply = await read_info(peer.channel, timeout)
        except MeshError as exc:
            peer.error, peer.failure, peer.info = exc.message, exc, None
            return peer
        peer.info, peer.links, peer.rtt_ms = reply.node, reply.links, reply.rtt_ms
        peer.error = peer.failure = None
        peer.seen = time.time()
        return peer

    async def connect_all(self) -> list[Peer]:
        await asyncio.gather(*(self.connect(p) for p in self.peers.values()))
        return list(self.peers.values())

    def require_online(self) -> list[Peer]:
        down = [p for p in self.peers.values() if not p.online]
        if down:
            raise PeerLost(None, "; ".join(f"{p.label} {p.address}: {p.error or 'offline'}" for p in down))
        return list(self.peers.values())

    def model(self) -> ModelPreset:
        """The model every peer serves: Mismatch when they do not agree on it, by the dashboard's rule
        (:func:`meshtui.splitting.plan_preset`, which checks what the head's prepare checks)."""
        peers = self.require_online()
        if not peers:
            raise PeerLost(None, "no peer to run on: add one")
        try:
            return plan_preset(p.view() for p in peers)
        except PlanError as exc:
            raise Mismatch(str(exc)) from None

    def plan(self, split: str, tokens: int) -> SplitPlan:
        """``auto`` (every peer, balanced, within free memory) or a SPEC like ``A:0-15,B:16-31``."""
        preset = self.model()
        peers = list(self.peers.values())
        if split == "auto":
            # The dashboard's proposal, over the same views: no block speeds measured from here.
            return propose_plan([p.view() for p in peers], tokens, BlockSpeeds())
        return parse_split(split, {p.label: p.address for p in peers}, preset.num_blocks)

    def hosts(self) -> dict[PeerAddress, str]:
        """The box each answering peer runs on (meshd.node.nodeid.host_key of its host id; "" unknown)."""
        return {p.address: (p.info.host if p.info else None) or "" for p in self.peers.values()}

    def plan_notes(self, plan: SplitPlan) -> list[str]:
        """What the user should know about ``plan`` though it can run (the Split screen's notes)."""
        staged = {stage.peer: self.peer_at(stage.peer).view() for stage in plan.stages}
        note = compute_difference((view.label, view.model) for view in staged.values())
        return [note] if note else []

    def describe_plan(self, plan: SplitPlan) -> str:
        """``A:0-15 => B:16-23 -> C:24-31``: ``=>`` is a link within one box, ``->`` one across the network."""
        same = same_host_links(plan, self.hosts())
        parts = [plan.stages[0].describe()] if plan.stages else []
        parts += [("=> " if local else "-> ") + stage.describe() for stage, local in zip(plan.stages[1:], same)]
        return " ".join(parts) + (" (=> same host)" if any(same) else "")

    def peer_at(self, address: PeerAddress) -> Peer:
        for p in self.peers.values():
            if p.address == address:
                return p
        raise PlanError(f"plan names {address}, which is not a known peer")

    def peer_named(self, name: str | None) -> Peer | None:
        """The peer an error names (daemons name peers ``host:port``, as plans do), if it is one of ours."""
        return next((p for p in self.peers.values() if str(p.address) == name), None)

    async def apply(self, plan: SplitPlan, on_event: EventFn | None = None) -> None:
        """Make every stage's peer hold exactly its blocks (loading with progress where needed).

        Each peer is asked what it holds now: one restarted since its last info holds nothing."""
        wanted: dict[str, set[int]] = {}
        for stage in plan.stages:
            wanted.setdefault(self.peer_at(stage.peer).label, set()).update(range(stage.start, stage.end))
        await asyncio.gather(*(self.connect(self.peers[label]) for label in wanted))
        down = [self.peers[label] for label in wanted if not self.peers[label].online]
        if down:
            raise PeerLost(None, "; ".join(f"{p.label} {p.address}: {p.error or 'offline'}" for p in down))

        async def load(label: str, blocks: set[int]) -> None:
            peer = self.peers[label]
            if peer.info.held == blocks:
                return
            wanted_ranges = ranges(sorted(blocks))
            await _call(on_event, LoadStarted(label, tuple(BlockRange(a, b) for a, b in wanted_ranges)))

            async def progress(frame) -> None:  # loading, then compiling for the default size
                await _call(on_event, events.from_wire(frame.header, label, sender=str(peer.address)))

            reply = await peer.channel.request("load", {"blocks": wanted_ranges}, on_event=progress,
                                             timeout=limits.LOAD_TIMEOUT_S)
            if isinstance(reply.header.get("node"), dict):
                peer.info = NodeInfo.from_wire(reply.header["node"])
            await _call(on_event, LoadDone(label, wire_number(reply.header.get("seconds"))))

        await asyncio.gather(*(load(label, blocks) for label, blocks in wanted.items()))

    async def generate(self, plan: SplitPlan, params: GenerationParams, *, codec: str = "auto", quality_floor: float | None = None,
                       measure_error: bool = True, return_latents: bool = False,
                       text_encoder: PeerAddress | None = None,
                       on_event: EventFn | None = None) -> GenerationOutcome:
        """Run one generation on the plan's head; its events (:mod:`meshtui.events`: queued, prepared, a step
        each, decode) stream to ``on_event`` and are kept in the outcome.

        ``text_encoder``: the peer that encodes the prompt (its text encoder), when not the head; the
        head fetches the embeddings from it and checks they come from the same text encoder."""
        head = self.peer_at(plan.stages[0].peer)
        if not head.online:
            await self.connect(head)
            self.require_online()
        seen: list[Event] = []

        async def handle(frame) -> None:
            event = events.from_wire(frame.header, sender=str(head.address))
            seen.append(event)
            await _call(on_event, event)

        fields = {"params": params.to_wire(), "plan": plan.to_wire(), "codec": codec, "measure_error": measure_error,
                  "return_latents": return_latents}
        if quality_floor is not None:
            fields["quality_floor"] = quality_floor
        if text_encoder is not None:
            fields["text_encoder"] = str(text_encoder)
        reply = await head.channel.request("generate", fields, on_event=handle, timeout=None)
        if len(reply.segments) != (2 if return_latents else 1):
            raise ProtocolViolation("generate reply must carry the PNG (and the latents if asked)", peer=head.name)
        latents = None
        if return_latents:
            (latents,) = unpack_raw([reply.header.get("latents")], reply.segments[1:], torch.device("cpu"))
        return GenerationOutcome(bytes(reply.segments[0]), reply.header.get("summary") or {}, seen, latents)

    async def generate_with_retry(self, plan: SplitPlan, params: GenerationParams, *, retries: int = 1,
                                  on_event: EventFn | None = None, **kw) -> tuple[GenerationOutcome, SplitPlan]:
        """:meth:`generate`; when a peer is lost (killed, frozen, cut off, shutting down), drop it,
        re-plan over the peers left, load that plan and run again, up to ``retries`` times. Returns the
        outcome and the plan it ran on. Other errors (a bad request, an OOM, a model mismatch) are final."""
        attempt = 0
        while True:
            try:
                return await self.generate(plan, params, on_event=on_event, **kw), plan
            except RETRYABLE as exc:
                if attempt >= retries:
                    raise
                attempt += 1
                lost = self.peer_named(exc.peer)
                encoder = kw.get("text_encoder")
                if encoder is not None and (str(encoder) == exc.peer or (lost is not None and lost.address == encoder)):
                    kw["text_encoder"] = None  # gone with its peer: the head encodes, if it can
                await _call(on_event, Retry(lost.label if lost else exc.peer, exc.message, attempt))
                plan = await self.replan(params, lost, on_event, failed=plan)

    async def replan(self, params: GenerationParams, lost: Peer | None = None, on_event: EventFn | None = None,
                     failed: SplitPlan | None = None) -> SplitPlan:
        """Drop ``lost`` and every peer that no longer answers, propose a plan over the rest and load it.

        Several generations that lose the same peer re-plan once: a generation whose ``failed`` plan
        is older than the last re-plan takes that one (loading yet another plan would pull blocks from
        under the generations already running on it), as long as all its peers still answer."""
        async with self._replanning:
            latest = self._replanned
            if latest is not None and failed is not latest:
                peers = [self.peer_named(str(s.peer)) for s in latest.stages]
                if all(p is not None for p in peers):
                    await asyncio.gather(*(self.connect(p) for p in peers))
                    if all(p.online for p in peers):
                        return latest
            if lost is not None and lost.label in self.peers:
                await self.remove(lost.label)
            await self.connect_all()
            for peer in [p for p in self.peers.values() if not p.online]:
                await self.remove(peer.label)
                await _call(on_event, Dropped(peer.label, peer.error))
            if not self.peers:
                raise PeerLost(None, "no peer is left to run on")
            preset = self.model()
            plan = self.plan("auto", tokens_for(preset, params.width, params.height))
            await _call(on_event, Replanned(plan.describe()))
            await self.apply(plan, on_event)
            self._replanned = plan
            return plan

    async def close(self) -> None:
        for peer in self.peers.values():
            if peer.channel is not None:
                with contextlib.suppress(Exception):
                    await peer.channel.close()
                peer.channel = None
