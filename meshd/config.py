"""meshd's configuration: a TOML file (default /etc/meshd/meshd.toml) overridden by flags.

Every key, its default and meaning is in systemd/meshd.toml.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

DEFAULT_CONFIG = Path("/etc/meshd/meshd.toml")
#: The ``weights`` option: as stored, dense, or quantised at load (the last three are
#: meshd.model.precision.LOAD_FORMATS; named here so that reading a config does not import torch).
WEIGHTS_CHOICES = ("auto", "bf16", "fp8", "gguf-q8_0", "gguf-q4_k")
#: The ``dtype`` option: what a span computes in, by torch's name (meshd.model.runtime.DTYPES maps them).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
CREDENTIAL_NAME = "cluster.key"
#: Instance N of the systemd template meshd@.service (one daemon per GPU) reads the section ["meshd@N"]
#: of the config file and the drop-in meshd@N.toml beside it, over the shared [meshd] settings.
INSTANCE_SECTION = re.compile(r"meshd@(\d{1,3})")
MAX_INSTANCE = 999


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
    weights: str = "auto"  # "auto" (as stored), "bf16", "fp8", "gguf-q8_0", "gguf-q4_k" (quantised at load)
    blocks: str = "none"  # "none", "all", or ranges like "0-15" / "0-3,20-31"
    random_weights: bool = False
    seed: int = 0
    key_file: Path = field(default_factory=default_key_file)
    insecure: bool = False
    models_dir: tuple[Path, ...] = field(default_factory=lambda: (default_models_dir(),))
    comfyui_dir: Path | None = None  # a ComfyUI install: its models/ is a model folder, its tokenizer is used
    distilled: bool | None = None  # klein base (false) or step-distilled (true); unset: detected
    lora_dir: tuple[Path, ...] = ()
    state_dir: Path = field(default_factory=default_state_dir)
    node_name: str = ""
    emulate_link: str = ""
    mdns: bool = True
    advertise_address: str = ""
    interfaces: tuple[str, ...] = ()
    quality_floor: float = 0.999
    same_host_ipc: bool = True  # CUDA IPC between stages on GPUs of one host (when it works)
    same_host_shm: bool = True  # else shared host memory between daemons of one host (when it works)
    text_encoder_device: str = ""  # where prompts are encoded; empty: the model's device
    text_encoder_idle: str = "release"  # after encoding: "release" (free it), "cpu" (park in RAM), "keep"
    prompt_cache_mib: int = 256  # prompt embeddings kept on the CPU
    telemetry_interval: float = 1.0
    nvenc_sessions: int = 2  # NVENC sessions per GPU this daemon may hold (a GeForce system has 8 in all)
    compile: str = "auto"  # the blocks through torch.compile: "auto" (CUDA only), "on"/true, "off"/false

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def lora_dirs(self) -> tuple[Path, ...]:
        """``lora_dir``, and a ComfyUI install's ``models/loras`` when ``comfyui_dir`` is set."""
        from .model.comfyui import lora_dirs  # noqa: PLC0415 - config stays free of the model code until asked

        return lora_dirs(self.lora_dir, self.comfyui_dir)


_PATHS = {"key_file", "state_dir", "comfyui_dir"}
#: Options that may be left to meshd: TOML has no null, so "" / "auto" say "unset".
_UNSET = {"comfyui_dir": "", "distilled": "auto"}
_PATH_LISTS = {"models_dir", "lora_dir"}
_STR_LISTS = {"interfaces"}


def _coerce(name: str, value: Any, base: Path) -> Any:
    kind = {f.name: f.type for f in fields(DaemonConfig)}[name]
    if name in _UNSET and value == _UNSET[name]:
        return None
    if name == "distilled" and not isinstance(value, bool):
        raise ConfigError(f'config key \'distilled\' must be true, false or "auto", got {value!r}')
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


def _read_section(file: Path, data: dict, name: str) -> dict[str, Any]:
    """The known keys of section ``name`` of a parsed file, coerced (paths relative to the file)."""
    section = data.get(name, {} if name != "meshd" else {k: v for k, v in data.items()
                                                           if not INSTANCE_SECTION.fullmatch(k)})
    if not isinstance(section, dict):
        raise ConfigError(f"{file}: [{name}] must be a table of settings")
    known = {f.name for f in fields(DaemonConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{file}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return {key: _coerce(key, value, file.parent) for key, value in section.items()}


def _parse(file: Path) -> dict:
    try:
        return tomllib.loads(file.read_text())
    except PermissionError:
        raise ConfigError(f"{file}: permission denied (not readable by uid {os.geteuid()})") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: {exc}") from exc


def instance_dropin(config_file: Path, instance: int) -> Path:
    """The drop-in of template instance ``instance``: ``meshd@N.toml`` beside the config file."""
    return config_file.parent / f"meshd@{instance}.toml"


def _instance_values(file: Path, data: dict, instance: int, base: dict[str, Any]) -> dict[str, Any]:
    """Instance N's settings: its own section and drop-in win; otherwise GPU N, the base port + N, a
    state directory of its own (node id, caches) under the shared one, and a name that says the GPU."""
    if not 0 <= instance <= MAX_INSTANCE:
        raise ConfigError(f"instance {instance} is out of range (0-{MAX_INSTANCE})")
    own = _read_section(file, data, f"meshd@{instance}") if f"meshd@{instance}" in data else {}
    dropin = instance_dropin(file, instance)
    if dropin.exists():
        extra = _parse(dropin)
        own |= _read_section(dropin, extra, f"meshd@{instance}" if f"meshd@{instance}" in extra else "meshd")
    defaults = DaemonConfig()
    derived: dict[str, Any] = {}
    port = base.get("port", defaults.port)
    derived["port"] = port + instance if port else 0  # 0: any free port, for each instance
    if base.get("device", defaults.device) in ("auto", "cuda"):
        derived["device"] = f"cuda:{instance}"
    derived["state_dir"] = Path(base.get("state_dir", defaults.state_dir)) / str(instance)
    derived["node_name"] = f"{base.get('node_name') or socket.gethostname()}-gpu{instance}"
    return derived | own


def load_config(path: Path | None, overrides: dict[str, Any] | None = None, *,
                instance: int | None = None) -> DaemonConfig:
    """Read ``path`` (missing default file = all defaults), then apply non-None ``overrides``.
    ``instance``: the settings of template instance meshd@N (see :func:`_instance_values`)."""
    config = DaemonConfig()
    values: dict[str, Any] = {}
    file = path if path is not None else DEFAULT_CONFIG
    data: dict = {}
    if file.exists():
        data = _parse(file)
        values = _read_section(file, data, "meshd")
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    if instance is not None:
        values |= _instance_values(file, data, instance, values)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, Path.cwd()) if not isinstance(value, (Path, tuple)) else value
    config = replace(config, **values)
    if not 0 <= config.port < 65536:  # 0: any free port
        raise ConfigError(f"port {config.port} is out of range")
    if not 1 <= config.nvenc_sessions <= 8:
        raise ConfigError(f"nvenc_sessions {config.nvenc_sessions} must be 1-8 (a GeForce system allows 8 NVENC "
                          "sessions in all, shared with every other program)")
    if not 0 <= config.quality_floor <= 1:  # NaN too: TOML has nan
        raise ConfigError(f"quality_floor {config.quality_floor!r} must be a cosine in [0, 1] (default 0.999)")
    if not 0 < config.telemetry_interval < float("inf"):
        raise ConfigError(f"telemetry_interval {config.telemetry_interval!r} must be a number of seconds above 0")
    if config.prompt_cache_mib < 0:
        raise ConfigError(f"prompt_cache_mib {config.prompt_cache_mib} must be 0 or more (0: no prompt cache)")
    if config.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype {config.dtype!r} must be {', '.join(COMPUTE_DTYPES[:-1])} or {COMPUTE_DTYPES[-1]}")
    if config.weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"weights {config.weights!r} must be one of {', '.join(WEIGHTS_CHOICES)}")
    if config.comfyui_dir is not None:
        from .model.comfyui import ComfyInstall  # noqa: PLC0415
        from .model.tensorfiles import ModelError  # noqa: PLC0415

        try:
            ComfyInstall.at(config.comfyui_dir)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
    return config


def instances_configured(path: Path | None) -> list[int]:
    """Template instances the config names: ["meshd@N"] sections and meshd@N.toml drop-ins beside it."""
    file = path if path is not None else DEFAULT_CONFIG
    found: set[int] = set()
    if file.exists():
        found |= {int(m.group(1)) for k in _parse(file) if (m := INSTANCE_SECTION.fullmatch(k))}
    if file.parent.is_dir():
        found |= {int(m.group(1)) for p in file.parent.glob("meshd@*.toml")
                  if (m := INSTANCE_SECTION.fullmatch(p.name.removesuffix(".toml")))}
    return sorted(found)


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
