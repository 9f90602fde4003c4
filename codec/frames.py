"""Laying uint8 channels out as YUV 4:4:4 video frames, and back.

A chunk of ``count`` tokens by ``C`` channels becomes ``C`` small images (one per channel) of the
chunk's token grid (``grid_h x grid_w``). Those tiles are packed ``tiles_x x tiles_y`` to a plane,
three planes (Y, U, V) to a frame. Channel ``c`` goes to frame ``c // (3P)``, plane
``(c // P) % 3``, tile ``c % P`` (row-major), with ``P = tiles_x * tiles_y``. Unused tiles and the
alignment margin are zero. Tiling and untiling are pure tensor reshapes, identical on CPU and GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import CodecError
from .limits import (
    FRAME_ALIGN,
    MAX_FRAME_SIDE,
    MAX_FRAMES_PER_CHUNK,
    MIN_FRAME_SIDE,
    TARGET_PLANE_AREA,
)


@dataclass(frozen=True)
class FrameGeometry:
    """How one chunk's channels are tiled into frames."""

    grid_h: int
    grid_w: int
    frames: int
    tiles_x: int
    tiles_y: int
    width: int
    height: int

    @property
    def tiles_per_plane(self) -> int:
        return self.tiles_x * self.tiles_y

    @property
    def slots(self) -> int:
        """Channel slots in all frames of the chunk."""
        return 3 * self.frames * self.tiles_per_plane

    @property
    def frame_bytes(self) -> int:
        """Raw size of one 4:4:4 8-bit frame."""
        return 3 * self.width * self.height

    def check(self, count: int, channels: int) -> None:
        """Raise CodecError unless this geometry can hold ``count`` tokens of ``channels`` channels."""
        values = (self.grid_h, self.grid_w, self.frames, self.tiles_x, self.tiles_y, self.width, self.height)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise CodecError(f"frame geometry {values} has a non-positive or non-integer field")
        if self.frames > MAX_FRAMES_PER_CHUNK:
            raise CodecError(f"chunk declares {self.frames} frames; the limit is {MAX_FRAMES_PER_CHUNK}")
        for side, name in ((self.width, "width"), (self.height, "height")):
            if not MIN_FRAME_SIDE <= side <= MAX_FRAME_SIDE or side % FRAME_ALIGN:
                raise CodecError(
                    f"frame {name} {side} must be a multiple of {FRAME_ALIGN} in "
                    f"[{MIN_FRAME_SIDE}, {MAX_FRAME_SIDE}]"
                )
        if self.grid_h * self.grid_w < count:
            raise CodecError(f"token grid {self.grid_h}x{self.grid_w} cannot hold {count} tokens")
        if self.tiles_x * self.grid_w > self.width or self.tiles_y * self.grid_h > self.height:
            raise CodecError(
                f"{self.tiles_x}x{self.tiles_y} tiles of {self.grid_w}x{self.grid_h} do not fit a "
                f"{self.width}x{self.height} frame"
            )
        if self.slots < channels:
            raise CodecError(f"{self.frames} frames hold {self.slots} channels, fewer than {channels}")
        if self.slots - channels >= 3 * self.tiles_per_plane:
            raise CodecError(f"{self.frames} frames for {channels} channels leave a whole frame empty")

    def to_list(self) -> list[int]:
        return [self.grid_h, self.grid_w, self.frames, self.tiles_x, self.tiles_y, self.width, self.height]

    @classmethod
    def from_list(cls, values: object) -> FrameGeometry:
        if not isinstance(values, (list, tuple)) or len(values) != 7:
            raise CodecError(f"frame geometry must be a list of 7 integers, got {values!r:.80}")
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            raise CodecError(f"frame geometry must be integers, got {values!r:.80}")
        return cls(*values)


def near_square_grid(count: int) -> tuple[int, int]:
    """A ``(rows, cols)`` grid for ``count`` tokens with no spatial layout: near-square, little padding."""
    if count < 1:
        raise CodecError("a chunk needs at least one token")
    root = math.isqrt(count)
    for cols in range(max(root, 1), min(2 * root, count) + 1):
        if count % cols == 0:
            return count // cols, cols
    cols = root if root * root == count else root + 1
    return math.ceil(count / cols), cols


def _align(value: int) -> int:
    return max(MIN_FRAME_SIDE, -(-value // FRAME_ALIGN) * FRAME_ALIGN)


def plan_geometry(count: int, channels: int, grid: tuple[int, int] | None = None) -> FrameGeometry:
    """Choose frame geometry for ``count`` tokens x ``channels`` channels on ``grid`` (rows, cols)."""
    if channels < 1:
        raise CodecError("a tensor needs at least one channel")
    grid_h, grid_w = grid if grid is not None else near_square_grid(count)
    if grid_h * grid_w < count:
        raise CodecError(f"grid {grid_h}x{grid_w} cannot hold {count} tokens")
    tile_area = grid_h * grid_w
    max_tiles_x = MAX_FRAME_SIDE // grid_w
    max_tiles_y = MAX_FRAME_SIDE // grid_h
    if max_tiles_x < 1 or max_tiles_y < 1:
        raise CodecError(f"a {grid_h}x{grid_w} token grid does not fit a {MAX_FRAME_SIDE}-pixel frame")
    frames = max(1, math.ceil(channels * tile_area / (3 * TARGET_PLANE_AREA)))
    while True:
        per_plane = math.ceil(channels / (3 * frames))
        # Near-square planes: tiles_x * grid_w ~ tiles_y * grid_h.
        tiles_x = max(1, min(max_tiles_x, round(math.sqrt(per_plane * grid_h / grid_w))))
        tiles_y = math.ceil(per_plane / tiles_x)
        if tiles_y > max_tiles_y:
            tiles_y = max_tiles_y
            tiles_x = math.ceil(per_plane / tiles_y)
        if tiles_x <= max_tiles_x:
            break
        frames += 1
        if frames > MAX_FRAMES_PER_CHUNK:
            raise CodecError(f"{channels} channels of {grid_h}x{grid_w} tokens need too many frames")
    geometry = FrameGeometry(
        grid_h=grid_h,
        grid_w=grid_w,
        frames=frames,
        tiles_x=tiles_x,
        tiles_y=tiles_y,
        width=_align(tiles_x * grid_w),
        height=_align(tiles_y * grid_h),
    )
    geometry.check(count, channels)
    return geometry


def tile(q: torch.Tensor, geometry: FrameGeometry) -> torch.Tensor:
    """``[count, C]`` uint8 -> ``[frames, 3 * height, width]`` uint8 planar YUV 4:4:4 frames."""
    count, channels = q.shape
    g = geometry
    grid = torch.zeros((g.grid_h * g.grid_w, g.slots), dtype=torch.uint8, device=q.device)
    grid[:count, :channels] = q
    planes = (
        grid.view(g.grid_h, g.grid_w, g.frames, 3, g.tiles_y, g.tiles_x)
        .permute(2, 3, 4, 0, 5, 1)
        .reshape(g.frames, 3, g.tiles_y * g.grid_h, g.tiles_x * g.grid_w)
    )
    out = torch.zeros((g.frames, 3, g.height, g.width), dtype=torch.uint8, device=q.device)
    out[:, :, : planes.shape[2], : planes.shape[3]] = planes
    return out.view(g.frames, 3 * g.height, g.width)


def untile(frames: torch.Tensor, geometry: FrameGeometry, count: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`tile`: ``[frames, 3 * height, width]`` -> ``[count, C]`` uint8."""
    g = geometry
    planes = frames.view(g.frames, 3, g.height, g.width)[:, :, : g.tiles_y * g.grid_h, : g.tiles_x * g.grid_w]
    grid = (
        planes.reshape(g.frames, 3, g.tiles_y, g.grid_h, g.tiles_x, g.grid_w)
        .permute(3, 5, 0, 1, 2, 4)
        .reshape(g.grid_h * g.grid_w, g.slots)
    )
    return grid[:count, :channels]
