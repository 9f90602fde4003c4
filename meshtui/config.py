"""The dashboard's own settings: a TOML file that remembers peers and the last generation settings.

Default location: ``$MESHTUI_CONFIG`` or ``<user config dir>/flux-mesh/meshtui.toml`` (platformdirs).
A missing file means defaults; a broken one is reported and left alone (never overwritten until the
user changes something). The file is small and flat, so it is written by :func:`dumps` here rather
than with a TOML writer dependency.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from meshd.pipeline.plan import PeerAddress

CONFIG_ENV = "MESHTUI_CONFIG"
IMAGE_MODES = ("auto", "graphics", "halfblock")


def default_config_path() -> Path:
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir("flux-mesh")) / "meshtui.toml"


def default_images_dir() -> Path:
    return Path(platformdirs.user_data_dir("flux-mesh")) / "images"


class ConfigError(ValueError):
    """A settings file the dashboard cannot read; the message names the file and the key."""


@dataclass(frozen=True)
class GenerateSettings:
    """The generation form's values; ``None`` means the model's default."""

    prompt: str = "a lighthouse on a cliff at dawn, oil painting"
    seed: int = 0
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    codec: str = "auto"


@dataclass(frozen=True)
class TuiConfig:
    peers: tuple[str, ...] = ()  # manual peers, HOST:PORT
    key_file: Path | None = None  # None: meshd's default cluster key
    images_dir: Path = field(default_factory=default_images_dir)
    image_mode: str = "auto"  # auto | graphics | halfblock
    poll_interval: float = 2.0  # seconds between health polls of a peer
    telemetry_interval: float = 1.0  # seconds between telemetry samples asked of a peer
    discovery: bool = True  # browse mDNS for peers
    generate: GenerateSettings = field(default_factory=GenerateSettings)


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "str | None": (str, type(None)), "int | None": (int, type(None)), "float | None": (int, float, type(None)),
}


def _typed(cls, section: dict, where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in section.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        if key in ("key_file", "images_dir"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: {key} must be a path")
            out[key] = Path(value).expanduser()
        elif key == "peers":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: peers must be a list of \"HOST:PORT\" strings")
            out[key] = tuple(value)
        elif key == "generate":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [generate] must be a table")
            out[key] = GenerateSettings(**_typed(GenerateSettings, value, f"{where} [generate]"))
        else:
            allowed = _TYPES.get(str(f.type))
            if allowed is None or not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ConfigError(f"{where}: {key} must be {f.type}, got {value!r}")
            out[key] = float(value) if "float" in str(f.type) and value is not None else value
    if out.get("image_mode", "auto") not in IMAGE_MODES:
        raise ConfigError(f"{where}: image_mode must be one of {', '.join(IMAGE_MODES)}")
    return out


def load_config(path: Path) -> TuiConfig:
    """Read ``path``; a missing file gives the defaults."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return TuiConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return TuiConfig(**_typed(TuiConfig, data, str(path)))
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(config: TuiConfig) -> str:
    lines = ["# meshtui settings: written by the dashboard, safe to edit while it is not running.", ""]
    for f in fields(TuiConfig):
        value = getattr(config, f.name)
        if f.name == "generate" or value is None:
            continue
        lines.append(f"{f.name} = {_value(value)}")
    lines += ["", "[generate]"]
    for f in fields(GenerateSettings):
        value = getattr(config.generate, f.name)
        if value is not None:  # absent = the model's default
            lines.append(f"{f.name} = {_value(value)}")
    return "\n".join(lines) + "\n"


def save_config(config: TuiConfig, path: Path) -> None:
    """Write atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(config))
    os.replace(tmp, path)


def with_peer(config: TuiConfig, address: str) -> TuiConfig:
    return config if address in config.peers else replace(config, peers=(*config.peers, address))


def without_peer(config: TuiConfig, address: str) -> TuiConfig:
    """``config`` without ``address``, however the file spells it (``host:port`` compared parsed)."""
    gone = PeerAddress.parse(address)
    return replace(config, peers=tuple(p for p in config.peers if PeerAddress.parse(p) != gone))
