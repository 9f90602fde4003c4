"""The generation form: prompt, seed, size, steps, guidance, codec. It validates as you type and
posts the settings up; Enter in any field asks for a run."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select, Static

from meshd import limits
from meshd.model.presets import ModelPreset

from ..config import GenerateSettings
from ..splitting import CODEC_CHOICES


class FormError(ValueError):
    """A field the user must fix; the message names it."""


def parse_settings(values: dict[str, str], codec: str, preset: ModelPreset | None) -> GenerateSettings:
    """The form's text as settings (blank size/steps/guidance: the model's default)."""
    seed_text = values["seed"].strip() or "0"
    if not seed_text.isdigit():
        raise FormError(f"seed {seed_text!r} must be a whole number >= 0")
    width = height = None
    size_text = values["size"].strip().lower()
    if size_text:
        a, _, b = size_text.partition("x")
        if not a.isdigit() or (b and not b.isdigit()):
            raise FormError(f"size {size_text!r}: write N or WxH in pixels")
        width, height = int(a), int(b or a)
        multiple = preset.size_multiple if preset else 1
        for side in (width, height):
            if not multiple <= side <= limits.MAX_IMAGE_SIDE or side % multiple:
                raise FormError(f"size sides must be multiples of {multiple} up to {limits.MAX_IMAGE_SIDE}")
    steps = None
    if values["steps"].strip():
        if not values["steps"].strip().isdigit() or not 1 <= int(values["steps"]) <= limits.MAX_STEPS:
            raise FormError(f"steps must be 1-{limits.MAX_STEPS}")
        steps = int(values["steps"])
    guidance = None
    if values["guidance"].strip():
        try:
            guidance = float(values["guidance"])
        except ValueError:
            raise FormError("guidance must be a number") from None
        if not 0 <= guidance <= 100:
            raise FormError("guidance must be within 0-100")
    if len(values["prompt"].encode()) > limits.MAX_PROMPT_BYTES:
        raise FormError(f"the prompt is longer than {limits.MAX_PROMPT_BYTES} bytes")
    return GenerateSettings(values["prompt"], int(seed_text), width, height, steps, guidance, codec)


class GenerateForm(Vertical):
    class Changed(Message):
        def __init__(self, settings: GenerateSettings | None, error: str | None) -> None:
            super().__init__()
            self.settings, self.error = settings, error

    class Submitted(Message):
        """Enter was pressed in a field."""

    def __init__(self, settings: GenerateSettings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.preset: ModelPreset | None = None

    def compose(self) -> ComposeResult:
        s = self.settings
        yield Label("Prompt")
        yield Input(s.prompt, placeholder="what to draw", id="prompt")
        with Horizontal(classes="form-row"):
            with Vertical():
                yield Label("Seed")
                yield Input(str(s.seed), id="seed", restrict=r"\d*")
            with Vertical():
                yield Label("Size (N or WxH)")
                yield Input(f"{s.width}x{s.height}" if s.width else "", placeholder="model default", id="size")
        with Horizontal(classes="form-row"):
            with Vertical():
                yield Label("Steps")
                yield Input(str(s.steps or ""), placeholder="model default", id="steps", restrict=r"\d*")
            with Vertical():
                yield Label("Guidance")
                yield Input("" if s.guidance is None else f"{s.guidance:g}", placeholder="model default",
                            id="guidance")
        yield Label("Codec ('auto': chosen per link)")
        choices = CODEC_CHOICES if s.codec in CODEC_CHOICES else (*CODEC_CHOICES, s.codec)
        yield Select([(c, c) for c in choices], value=s.codec, allow_blank=False, id="codec")
        yield Static("", id="form-error")

    def set_preset(self, preset: ModelPreset | None) -> None:
        """Show the model's defaults as placeholders and validate sizes against it."""
        self.preset = preset
        if preset is not None:
            self.query_one("#size", Input).placeholder = f"default {preset.default_size}"
            self.query_one("#steps", Input).placeholder = f"default {preset.default_steps}"
            self.query_one("#guidance", Input).placeholder = f"default {preset.default_guidance:g}"
        self._validate()

    def _validate(self) -> None:
        values = {name: self.query_one(f"#{name}", Input).value for name in ("prompt", "seed", "size", "steps",
                                                                              "guidance")}
        codec = str(self.query_one("#codec", Select).value)
        error = self.query_one("#form-error", Static)
        try:
            settings = parse_settings(values, codec, self.preset)
        except FormError as exc:
            error.update(str(exc))
            self.post_message(self.Changed(None, str(exc)))
            return
        error.update("")
        self.settings = settings
        self.post_message(self.Changed(settings, None))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._validate()

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._validate()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Submitted())
