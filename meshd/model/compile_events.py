"""The ``compiling`` / ``compiled`` events a peer sends while it compiles its blocks for a new size,
and their wording, shared by the daemon's log, ``meshtui generate`` and the dashboard (no torch here)."""

from __future__ import annotations

from ..config import describe_ranges
from ..fields import wire_number


def compiling_event(node: str, blocks: str, vae: bool, size: str, tokens: int, cached: bool,
                    estimate_s: float | None) -> dict:
    """The event sent before a compile: who, which blocks (and whether the VAE decoder too), for which
    size, and how long it should take."""
    return {"kind": "compiling", "node": node, "blocks": blocks, "size": size, "tokens": tokens, "cached": cached,
            "estimate_s": estimate_s, "vae": vae}


def pending_parts(blocks, pending) -> tuple[str, bool]:
    """For :func:`compiling_event`: the held ``blocks`` in words where a block graph is ``pending`` (else
    ""), and whether the VAE decoder's is."""
    vae = any(shape.kind == "vae" for shape in pending)
    return (describe_ranges(blocks) if len(pending) > vae else ""), vae


def compiled_event(node: str, seconds: float) -> dict:
    """The event sent once the compile is done."""
    return {"kind": "compiled", "node": node, "seconds": round(seconds, 2)}


def describe_event(event: dict) -> str | None:
    """A ``compiling`` / ``compiled`` event in words ("compiling blocks 0-15 on a for 1024x1024 (first time,
    ~18 s)"); None for any other event. Event fields are untrusted: odd ones are left out."""
    kind = event.get("kind")
    node = event.get("node")
    where = f" on {node[:64]}" if isinstance(node, str) and node else ""
    if kind == "compiling":
        blocks, size, estimate = event.get("blocks"), event.get("size"), event.get("estimate_s")
        what = f"blocks {blocks[:40]}" if isinstance(blocks, str) and blocks else "blocks"
        if event.get("vae") is True:
            what = f"{what} and the VAE decoder" if isinstance(blocks, str) and blocks else "the VAE decoder"
        for_size = f" for {size[:20]}" if isinstance(size, str) else ""
        how = "from the compile cache" if event.get("cached") is True else "first time"
        if wire_number(estimate) is not None:
            how += f", ~{estimate:.0f} s"
        return f"compiling {what}{where}{for_size} ({how})"
    if kind == "compiled":
        seconds = wire_number(event.get("seconds"))
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        return f"compiled{where}{took}"
    return None
