"""``meshd check``: what this box can do, in plain words, before anything is served.

Each check yields :class:`Finding` lines: ``ok`` (works), ``note`` (worth knowing: no GPU, NVENC
missing, mDNS off) or ``problem`` (meshd will not work as configured: unreadable key, no interface
for mDNS, a configured model that is not there). Nothing here changes the box.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import DaemonConfig

OK, NOTE, PROBLEM = "ok", "note", "problem"
UNIT_NAME = "meshd.service"
#: systemctl queries are local and quick; a hung D-Bus must not hang ``meshd check``.
SYSTEMCTL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Finding:
    topic: str
    level: str  # OK, NOTE or PROBLEM
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_gpus(nvml=None) -> Iterator[Finding]:
    from .telemetry import NvmlGpus  # noqa: PLC0415

    gpus = NvmlGpus(nvml).open()
    try:
        if gpus.reason:
            yield Finding("GPU", NOTE, f"no NVIDIA GPU readings: {gpus.reason}. meshd still runs, on the CPU "
                                       "(fine for the tiny demo, far too slow for real models)")
        for gpu in gpus.gpus:
            if gpu.lost:
                yield Finding("GPU", PROBLEM, f"GPU {gpu.index} ({gpu.uuid}) is lost: it fell off the bus or the "
                                              "driver reset it; reboot or reseat it")
                continue
            vram = f"{gpu.vram_total_bytes / (1 << 30):.0f} GiB" if gpu.vram_total_bytes else "VRAM n/a"
            yield Finding("GPU", OK, f"GPU {gpu.index}: {gpu.name}, {vram} ({gpu.uuid})")
            if gpu.unsupported:
                yield Finding("GPU", NOTE, f"GPU {gpu.index} cannot report: "
                                           + "; ".join(f"{what} ({why})" for what, why in gpu.unsupported.items())
                                           + " (shown as n/a)")
    finally:
        gpus.close()


def check_codecs() -> Iterator[Finding]:
    """NVENC/NVDEC as probed (a tiny encode and decode on each GPU), and the codecs each device speaks."""
    import torch  # noqa: PLC0415

    import codec  # noqa: PLC0415
    from codec.spec import CODEC_NAMES  # noqa: PLC0415

    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        caps = codec.probe(device)
        label = f"{device}" + (f" ({caps.gpu_name})" if caps.gpu_name else "")
        if device.startswith("cuda"):
            yield Finding("NVENC", OK if caps.nvenc else NOTE, f"{label}: " + (
                caps.nvenc_reason if caps.nvenc else f"no NVENC ({caps.nvenc_reason}); HEVC is encoded by libx265 "
                                                     "on the CPU instead"))
            yield Finding("NVDEC", OK if caps.nvdec else NOTE, f"{label}: " + (
                caps.nvdec_reason if caps.nvdec else f"no NVDEC ({caps.nvdec_reason}); HEVC is decoded by FFmpeg "
                                                     "on the CPU instead"))
        else:
            yield Finding("NVENC", NOTE, "no CUDA device: no NVENC/NVDEC; HEVC goes through libx265/FFmpeg on the CPU")
        speaks = []
        for name in CODEC_NAMES:
            send, receive = caps.can_encode(name), caps.can_decode(name)
            if name == "hevc" and (send or receive):
                speaks.append(f"hevc (encode {caps.hevc_encoder or 'no'}, decode {caps.hevc_decoder or 'no'})")
            elif send and receive:
                speaks.append(name)
        missing = [n for n in CODEC_NAMES if not (caps.can_encode(n) or caps.can_decode(n))]
        yield Finding("codecs", OK, f"{label}: {', '.join(speaks)}"
                      + (f"; not here: {', '.join(missing)}" if missing else ""))
        if not caps.cpu_hevc:
            yield Finding("codecs", NOTE, f"CPU HEVC: {caps.cpu_hevc_reason}")


def check_models(config: DaemonConfig) -> Iterator[Finding]:
    from .model.files import ModelError, ModelStore  # noqa: PLC0415
    from .model.presets import PRESETS  # noqa: PLC0415

    from .model.inventory import inventory_loras, inventory_models  # noqa: PLC0415
    from .model.lora import LoraStore  # noqa: PLC0415

    store = ModelStore(config.models_dir, config.cache_dir)
    folders = ", ".join(str(d) for d in store.dirs) or "none configured"
    reports = inventory_models(store)  # layout, precision and the hash the handshake compares, per model
    if not reports:
        yield Finding("models", NOTE, f"no model folders in {folders} (the tiny demo model is written there on "
                                      "first use; real checkpoints are your local files)")
    for report in reports:  # a broken file nobody configured is worth a note, not a failed check
        yield Finding("models", OK if report.ok else NOTE, report.describe())
    for report in inventory_loras(LoraStore(config.lora_dir), config.cache_dir):
        yield Finding("loras", OK if report.ok else NOTE, report.describe())
    if config.random_weights:
        known = config.model in PRESETS
        yield Finding("models", OK if known else PROBLEM,
                      f"configured: {config.model} with seeded random weights (benchmarks)" if known else
                      f"configured random_weights for {config.model!r}, which is not a preset ({', '.join(PRESETS)})")
    elif config.model != "tiny":
        try:
            yield Finding("models", OK, f"configured model {config.model}: {store.resolve(config.model)}")
        except ModelError as exc:
            yield Finding("models", PROBLEM, f"configured model {config.model!r}: {exc}")


def check_mdns(config: DaemonConfig) -> Iterator[Finding]:
    from .discovery import MdnsUnavailable, choose_for, require_zeroconf  # noqa: PLC0415

    if not config.mdns:
        yield Finding("mDNS", NOTE, "off (mdns = false): peers must add this box by hand (host:port)")
        return
    try:
        require_zeroconf()
    except MdnsUnavailable as exc:
        yield Finding("mDNS", PROBLEM, str(exc))
        return
    try:
        choice = choose_for(config)
    except ValueError as exc:
        yield Finding("mDNS", PROBLEM, str(exc))
        return
    if choice.advertise:
        yield Finding("mDNS", OK, f"will advertise {', '.join(choice.advertise)} port {config.port} "
                                  f"({choice.reason}); allow UDP 5353 and TCP {config.port} there")
    else:
        yield Finding("mDNS", PROBLEM, f"nothing to advertise on: {choice.reason}")
    if choice.skipped:
        yield Finding("mDNS", NOTE, f"not used: {', '.join(choice.skipped)}")


def check_key(config: DaemonConfig) -> Iterator[Finding]:
    from .auth import AuthError, fingerprint, key_is_private, read_key  # noqa: PLC0415

    if config.insecure:
        yield Finding("key", PROBLEM, "authentication is OFF (insecure = true): anyone who reaches the port can "
                                      "use this GPU")
        return
    try:
        key = read_key(config.key_file)
    except AuthError as exc:
        yield Finding("key", PROBLEM, str(exc))
        return
    yield Finding("key", OK, f"cluster key {config.key_file} is readable (fingerprint {fingerprint(key)})")
    if not key_is_private(config.key_file):
        yield Finding("key", PROBLEM, f"{config.key_file} is readable by group or others: chmod 600 it")


def _systemctl(*args: str) -> str | None:
    """The first line systemctl prints (``enabled``, ``active``, ...), or None if it cannot be asked."""
    try:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return lines[0] if lines else ""


def check_systemd() -> Iterator[Finding]:
    if shutil.which("systemctl") is None:
        yield Finding("systemd", NOTE, "no systemctl here: run meshd serve under your own supervisor")
        return
    if not Path("/run/systemd/system").is_dir():
        yield Finding("systemd", NOTE, "systemd is installed but not running this box (a container?)")
        return
    enabled = _systemctl("is-enabled", UNIT_NAME)
    active = _systemctl("is-active", UNIT_NAME)
    if enabled in (None, "", "not-found") or (enabled or "").startswith("Failed"):
        yield Finding("systemd", NOTE, f"{UNIT_NAME} is not installed (sudo meshd install-unit)")
        return
    level = OK if active == "active" else PROBLEM if active == "failed" else NOTE
    yield Finding("systemd", level, f"{UNIT_NAME}: {enabled}, {active}"
                  + ("" if active == "active" else " (journalctl -u meshd for why)"))


def check_node_id(config: DaemonConfig) -> Iterator[Finding]:
    from .nodeid import read_node_id  # noqa: PLC0415

    node_id = read_node_id(config.state_dir)
    yield Finding("node", OK if node_id else NOTE,
                  f"node id {node_id} (in {config.state_dir})" if node_id else
                  f"no node id in {config.state_dir} yet: one is made on first start")


def check_compile(config: DaemonConfig) -> Iterator[Finding]:
    """Whether the blocks are compiled on the configured device, what that needs, and the compile cache."""
    import torch  # noqa: PLC0415

    from .model.compiled import CompileCache, wanted  # noqa: PLC0415

    name = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        yield Finding("compile", PROBLEM, f"device {name!r} is not a device torch knows")
        return
    on, why = wanted(config.compile, device)
    yield Finding("compile", OK if on or config.compile == "off" else NOTE, f"compiled blocks {why}")
    if on and device.type == "cuda":
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:
            yield Finding("compile", PROBLEM, "compile is on for a CUDA device, but the triton package is missing "
                                              "(it comes with CUDA builds of torch): install it or set compile = false")
    elif on and shutil.which("c++") is None:
        yield Finding("compile", PROBLEM, "compile is on for the CPU, but no C++ compiler (c++) is on PATH: install "
                                          "one or set compile = false")
    cache = CompileCache(config.state_dir / "compile")
    entries = cache.index()
    if not entries:
        yield Finding("compile", NOTE if on else OK,
                      f"compile cache {cache.root} is empty: the first generation at each image size compiles the "
                      "blocks first (~20 s for klein-9B on an H200, announced on the dashboard)" if on else
                      f"compile cache {cache.root} is empty")
        return
    shown = []
    for key, entry in sorted(entries.items(), key=lambda kv: str(kv[1].get("at", "")), reverse=True)[:6]:
        model, kind, tokens = (key.split("|") + ["", "", ""])[:3]
        seconds = entry.get("cold_s", entry.get("cached_s"))
        took = f" {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
        shown.append(f"{model} {kind} @{tokens} tokens{took}")
    size = cache.size_bytes()
    yield Finding("compile", OK, f"compile cache {cache.root}: {len(entries)} block graphs, {size / (1 << 20):.0f} MiB "
                                 f"({'; '.join(shown)}{'; ...' if len(entries) > len(shown) else ''}); a restart "
                                 "compiles these from the cache in seconds")


def run_checks(config: DaemonConfig, *, codecs: bool = True, nvml=None) -> list[Finding]:
    """Every check; ``codecs=False`` skips the NVENC/NVDEC probe (it imports torch and opens encoders)."""
    findings: list[Finding] = []
    findings += check_gpus(nvml)
    if codecs:
        findings += check_codecs()
    findings += check_models(config)
    findings += check_compile(config)
    findings += check_mdns(config)
    findings += check_key(config)
    findings += check_systemd()
    findings += check_node_id(config)
    return findings


def render(findings: list[Finding]) -> str:
    marks = {OK: "ok  ", NOTE: "note", PROBLEM: "FAIL"}
    width = max((len(f.topic) for f in findings), default=0)
    lines = [f"[{marks[f.level]}] {f.topic.ljust(width)}  {f.text}" for f in findings]
    problems = sum(f.level == PROBLEM for f in findings)
    lines.append(f"{problems} problem{'s' if problems != 1 else ''}" if problems else "no problems found")
    return "\n".join(lines)


def exit_status(findings: list[Finding]) -> int:
    return 1 if any(f.level == PROBLEM for f in findings) else 0
