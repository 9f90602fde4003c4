"""What one generation asks for: :class:`GenerationParams`, the one type every part uses, from the
command line and the dashboard's form to the head daemon's sampler.

No torch and no model code here (the dashboard and ``meshtui generate`` build requests without them);
the daemon's strict parsing of a request off the wire, :meth:`GenerationParams.from_wire`, reads the
LoRA rules from the model code, which a daemon has loaded anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import limits
from ..errors import BadRequest
from ..fields import wire_int, wire_number

if TYPE_CHECKING:
    from ..model.lora import LoraSpec


@dataclass(frozen=True)
class LoraByName:
    """A LoRA a client names without its hash (``--lora NAME[:STRENGTH]``): the head resolves it to its
    own copy's sha256 (``HeadService.resolve_loras`` in meshd.pipeline.head), and every stage then finds its copy by hash."""

    name: str
    strength: float = 1.0

    def to_wire(self) -> dict:
        return {"name": self.name, "strength": self.strength}


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    seed: int = 0
    width: int = 1024
    height: int = 1024
    steps: int = 4
    guidance: float = 1.0
    #: Applied on every peer from its own copy. A parsed request (``from_wire``) holds LoraSpecs only.
    loras: tuple[LoraSpec | LoraByName, ...] = ()

    def to_wire(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "width": self.width, "height": self.height,
                "steps": self.steps, "guidance": self.guidance, "loras": [lora.to_wire() for lora in self.loras]}

    @classmethod
    def from_wire(cls, data: object, multiple: int = 16) -> GenerationParams:
        """Validate untrusted parameters; BadRequest names the first bad field."""
        from ..model.lora import loras_from_wire  # noqa: PLC0415 - the model code: only daemons parse requests

        if not isinstance(data, dict):
            raise BadRequest("generation parameters must be a map")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or len(prompt.encode()) > limits.MAX_PROMPT_BYTES:
            raise BadRequest(f"prompt must be text of at most {limits.MAX_PROMPT_BYTES} bytes")
        out = {"prompt": prompt}
        for name, lo, hi in (("seed", 0, 2**63 - 1), ("width", multiple, limits.MAX_IMAGE_SIDE),
                             ("height", multiple, limits.MAX_IMAGE_SIDE), ("steps", 1, limits.MAX_STEPS)):
            value = wire_int(data.get(name))
            if value is None or not lo <= value <= hi:
                raise BadRequest(f"{name}={data.get(name)!r:.20} must be an integer in [{lo}, {hi}]")
            out[name] = value
        for side in ("width", "height"):
            if out[side] % multiple:
                raise BadRequest(f"{side} {out[side]} must be a multiple of {multiple} for this model")
        guidance = wire_number(data.get("guidance"))
        if guidance is None or not 0 <= guidance <= 100:
            raise BadRequest(f"guidance={data.get('guidance')!r:.20} must be a number in [0, 100]")
        out["guidance"] = guidance
        out["loras"] = loras_from_wire(data.get("loras"))
        return cls(**out)
