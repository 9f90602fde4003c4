"""The finished image in the terminal.

Where the terminal speaks Sixel or the kitty graphics protocol, textual-image draws real pixels.
Elsewhere (most terminals, tmux, CI) two pixels go in each cell: the upper half block ``▀`` in the
top pixel's colour on the bottom pixel's colour. textual-image asks the terminal what it supports
when it is first imported, which only works before Textual takes over the terminal: call
:func:`detect_image_mode` before the app runs.
"""

from __future__ import annotations

import logging

from PIL import Image as PILImage
from rich.style import Style
from rich.text import Text
from textual.containers import Container
from textual.widget import Widget
from textual.widgets import Static

log = logging.getLogger(__name__)


def detect_image_mode(preference: str = "auto") -> str:
    """``"graphics"`` (textual-image) or ``"halfblock"``, from the preference and the terminal."""
    if preference == "halfblock":
        return "halfblock"
    try:
        from textual_image import renderable  # noqa: PLC0415 - queries the terminal once, on import
        import textual_image.widget  # noqa: F401, PLC0415 - caches the cell size while it still can
    except Exception as exc:  # noqa: BLE001 - any failure here means: no graphics, use half blocks
        log.info("textual-image unavailable (%s); drawing images with half blocks", exc)
        return "halfblock"
    if preference == "graphics":
        return "graphics"
    return "graphics" if renderable.Image in (renderable.SixelImage, renderable.TGPImage) else "halfblock"


def fit(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The largest (w, h) within ``width`` x ``height`` with the aspect ratio of ``size``."""
    w, h = size
    scale = min(width / w, height / h)
    return max(1, int(w * scale)), max(1, int(h * scale))


def half_blocks(image: PILImage.Image, columns: int, rows: int) -> Text:
    """``image`` in at most ``columns`` x ``rows`` cells, two square pixels per cell."""
    w, h = fit(image.size, columns, rows * 2)
    h += h % 2
    pixels = image.convert("RGB").resize((w, h), PILImage.Resampling.LANCZOS).load()
    text = Text(no_wrap=True, overflow="crop")
    for y in range(0, h, 2):
        if y:
            text.append("\n")
        for x in range(w):
            top, bottom = pixels[x, y], pixels[x, y + 1]
            text.append("▀", Style(color=f"rgb({top[0]},{top[1]},{top[2]})",
                                   bgcolor=f"rgb({bottom[0]},{bottom[1]},{bottom[2]})"))
    return text


class HalfBlockImage(Widget):
    """An image drawn with :func:`half_blocks`, fitted to the widget's size."""

    def __init__(self, image: PILImage.Image, **kwargs) -> None:
        super().__init__(**kwargs)
        self.image = image
        self._cache: tuple[tuple[int, int], Text] | None = None

    def render(self) -> Text:
        size = (self.content_size.width, self.content_size.height)
        if size[0] < 1 or size[1] < 1:
            return Text()
        if self._cache is None or self._cache[0] != size:
            self._cache = (size, half_blocks(self.image, *size))
        return self._cache[1]


class ImageView(Container):
    """Shows one image (or a line saying why there is none) in the chosen mode."""

    def __init__(self, mode: str = "halfblock", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.image: PILImage.Image | None = None
        self._placeholder: str | None = None

    def compose(self):
        yield Static("The image appears here when a generation finishes.", classes="placeholder")

    def show(self, image: PILImage.Image | None, placeholder: str = "") -> None:
        if image is self.image and (image is not None or placeholder == self._placeholder):
            return
        self.image, self._placeholder = image, placeholder
        self.remove_children()
        if image is None:
            self.mount(Static(placeholder or "No image.", classes="placeholder"))
        elif self.mode == "graphics":
            from textual_image.widget import Image as GraphicsImage  # noqa: PLC0415

            self.mount(GraphicsImage(image))
        else:
            self.mount(HalfBlockImage(image))
