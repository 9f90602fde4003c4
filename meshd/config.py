"""meshd's configuration: a TOML file (default /etc/meshd/meshd.toml) overridden by flags.

Every key, its default and meaning is in systemd/meshd.toml.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

DEFAULT_CONFIG = Path("/etc/meshd/meshd.toml")
CREDENTIAL_NAME = "cluster.key"


def default_models_dir() -> Path:
    if os.geteuid() == 0 or os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/meshd").split(":")[0]) / "models"
    return Path(platformdirs.user_data_dir("flux-mesh")) / "models"


def default_key_file() -> Path:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return Path(creds) / CREDENTIAL_NAME
    if os.geteuid() == 0:
        return Path("/etc/meshd") / CREDENTIAL_NAME
    return Path(platformdirs.user_config_dir("flux-mesh")) / CREDENTIAL_NAME


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/meshd")
    return Path(platformdirs.user_state_dir("flux-mesh"))


class ConfigError(ValueError):
    """A configuration file or flag with a value meshd cannot use."""


#: ``compile``: "auto" compiles the blocks on CUDA devices only (a CPU compile needs a C++ compiler and
#: takes long for no gain worth having); "on" forces it, "off" runs them eagerly.
COMPILE_SETTINGS = ("auto", "on", "off")


def parse_compile(value: object) -> str:
    """``compile`` from meshd.toml (true / false / "auto") or the CLI (on / off / auto) as one of COMPILE_SETTINGS."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = {"true": "on", "false": "off"}.get(str(value).strip().lower(), str(value).strip().lower())
    if text not in COMPILE_SETTINGS:
        raise ConfigError(f"compile = {value!r:.20} must be true, false or \"auto\" (on the command line: on, off, auto)")
    return text


@dataclass(frozen=True)
class DaemonConfig:
    host: str = "0.0.0.0"
    port: int = 7777
    model: str = "tiny"
    device: str = "auto"
    dtype: str = "bfloat16"
    blocks: str = "none"  # "none", "all", or ranges like "0-15" / "0-3,20-31"
    random_weights: bool = False
    seed: int = 0
    key_file: Path = field(default_factory=default_key_file)
    insecure: bool = False
    models_dir: tuple[Path, ...] = field(default_factory=lambda: (default_models_dir(),))
    lora_dir: tuple[Path, ...] = ()
    state_dir: Path = field(default_factory=default_state_dir)
    node_name: str = ""
    emulate_link: str = ""
    mdns: bool = True
    advertise_address: str = ""
    interfaces: tuple[str, ...] = ()
    quality_floor: float = 0.999
    same_host_ipc: bool = True  # CUDA IPC between stages on GPUs of one host (when it works)
    text_encoder_device: str = ""  # where prompts are encoded; empty: the model's device
    text_encoder_idle: str = "release"  # after encoding: "release" (free it), "cpu" (park in RAM), "keep"
    prompt_cache_mib: int = 256  # prompt embeddings kept on the CPU
    telemetry_interval: float = 1.0
    compile: str = "auto"  # the blocks through torch.compile: "auto" (CUDA only), "on"/true, "off"/false

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"


_PATHS = {"key_file", "state_dir"}
_PATH_LISTS = {"models_dir", "lora_dir"}
_STR_LISTS = {"interfaces"}


def _coerce(name: str, value: Any, base: Path) -> Any:
    kind = {f.name: f.type for f in fields(DaemonConfig)}[name]
    if name == "compile":
        return parse_compile(value)
    if name in _PATHS:
        return (base / Path(str(value)).expanduser()) if not Path(str(value)).expanduser().is_absolute() else Path(str(value)).expanduser()
    if name in _PATH_LISTS:
        items = value if isinstance(value, list) else [value]
        return tuple(Path(str(v)).expanduser() if Path(str(v)).expanduser().is_absolute() else base / str(v) for v in items)
    if name in _STR_LISTS:
        items = value if isinstance(value, list) else [value]
        return tuple(str(v) for v in items)
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(kind))
    if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        raise ConfigError(f"config key {name!r} must be {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Read ``path`` (missing default file = all defaults), then apply non-None ``overrides``."""
    config = DaemonConfig()
    values: dict[str, Any] = {}
    file = path if path is not None else DEFAULT_CONFIG
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{file}: {exc}") from exc
        section = data.get("meshd", data)
        known = {f.name for f in fields(DaemonConfig)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"{file}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for key, value in section.items():
            values[key] = _coerce(key, value, file.parent)
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, Path.cwd()) if not isinstance(value, (Path, tuple)) else value
    config = replace(config, **values)
    if not 0 <= config.port < 65536:  # 0: any free port
        raise ConfigError(f"port {config.port} is out of range")
    if config.dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype {config.dtype!r} must be bfloat16, float16 or float32")
    return config


def parse_blocks(text: str, num_blocks: int) -> list[int]:
    """``none``, ``all``, or inclusive ranges ``0-15`` / ``0-3,20-31`` / ``7``."""
    text = text.strip().lower()
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(num_blocks))
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            a, b = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"cannot read block range {part!r} (write 0-15 or 0-3,20-31)") from None
        if not 0 <= a <= b < num_blocks:
            raise ConfigError(f"block range {part.strip()} is outside 0-{num_blocks - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def ranges(blocks: list[int] | tuple[int, ...]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0, 3], [5, 7]] (half-open)."""
    out: list[list[int]] = []
    for i in sorted(blocks):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def describe_ranges(blocks) -> str:
    parts = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges(list(blocks))]
    return ",".join(parts) or "none"
