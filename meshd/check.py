"""``meshd check``: what this box can do, in plain words, before anything is served.

Each check yields :class:`Finding` lines: ``ok`` (works), ``note`` (worth knowing: no GPU, NVENC
missing, mDNS off) or ``problem`` (meshd will not work as configured: unreadable key, no interface
for mDNS, a configured model that is not there). Nothing here changes the box.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import DaemonConfig

OK, NOTE, PROBLEM = "ok", "note", "problem"
UNIT_NAME = "meshd.service"
UNIT_DIR = Path("/etc/systemd/system")
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
    from .telemetry.nvml import NvmlGpus  # noqa: PLC0415

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
    """NVENC/NVDEC as probed now (an encode with each encoder configuration and a tiny decode on each
    device), and the codecs each device speaks. NVENC present but failing is a problem."""
    import torch  # noqa: PLC0415

    import codec  # noqa: PLC0415
    from codec.spec import CODEC_NAMES  # noqa: PLC0415

    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        caps = codec.probe(device, refresh=True)
        label = f"{device}" + (f" ({caps.gpu_name})" if caps.gpu_name else "")
        if caps.nvenc:
            yield Finding("NVENC", OK, f"{label}: {caps.nvenc_reason}")
        elif caps.nvenc_state == "failing":
            yield Finding("NVENC", PROBLEM, f"{label}: {caps.nvenc_reason}. HEVC falls back to libx265 on the CPU "
                                            "until this is fixed")
        elif device.startswith("cuda"):
            yield Finding("NVENC", NOTE, f"{label}: no NVENC ({caps.nvenc_reason}); HEVC is encoded by libx265 "
                                         "on the CPU instead")
        else:
            yield Finding("NVENC", NOTE, "no CUDA device: no NVENC/NVDEC; HEVC goes through libx265/FFmpeg on the CPU")
        if device.startswith("cuda"):
            yield Finding("NVDEC", OK if caps.nvdec else NOTE, f"{label}: " + (
                caps.nvdec_reason if caps.nvdec else f"no NVDEC ({caps.nvdec_reason}); HEVC is decoded by FFmpeg "
                                                     "on the CPU instead"))
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


#: The stream ``--selftest`` moves: FLUX.2 [klein] 9B's joint stream at 1024x1024 (512 text tokens
#: + a 64x64 image grid, 4096 channels).
SELFTEST_SHAPE = (1, 4608, 4096)
_SELFTEST_TEXT_TOKENS = 512


def selftest_stream(shape: tuple[int, ...], seed: int = 0):
    """A bf16 activation-like stream: smooth on the image grid, noisy, with a few huge channels
    (random data alone says little about a video codec: it has no spatial structure)."""
    import torch  # noqa: PLC0415

    batch, tokens, channels = shape
    g = torch.Generator().manual_seed(seed)
    text = min(_SELFTEST_TEXT_TOKENS, tokens // 9)
    side = int((tokens - text) ** 0.5)
    text = tokens - side * side
    rows = torch.arange(side, dtype=torch.float32).view(side, 1, 1)
    cols = torch.arange(side, dtype=torch.float32).view(1, side, 1)
    freq = torch.rand(channels, generator=g) * 0.3 + 0.02
    phase = torch.rand(channels, generator=g) * 6.28
    image = torch.sin(rows * freq + phase) * torch.cos(cols * freq.flip(0) + phase) + 0.1 * torch.randn(
        side, side, channels, generator=g)
    out = torch.cat([torch.randn(text, channels, generator=g), image.view(side * side, channels)])
    out[:, torch.randint(0, channels, (4,), generator=g)] *= 60.0  # FLUX-like outlier channels
    return out.expand(batch, tokens, channels).to(torch.bfloat16), text, side


def selftest(shape: tuple[int, ...] = SELFTEST_SHAPE) -> Iterator[Finding]:
    """Encode and decode a ``shape`` stream through this box's best HEVC path, lossless and at QP 18:
    milliseconds, bytes and the reconstruction error. What a GeForce user runs first."""
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    import codec  # noqa: PLC0415
    from codec import CodecSpec, TokenLayout  # noqa: PLC0415

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    caps = codec.probe(device)
    stream, text, side = selftest_stream(shape)
    stream = stream.to(device)
    for qp in (None, 18):
        spec = CodecSpec("hevc", qp=qp, layout=TokenLayout(text, side, side))
        path = f"{caps.hevc_encoder or 'no encoder'} -> {caps.hevc_decoder or 'no decoder'}"
        try:
            encoded = codec.encode(stream, spec)
            t0 = time.perf_counter()
            decoded = codec.decode(encoded, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            decode_ms = (time.perf_counter() - t0) * 1e3
            error = codec.reconstruction_error(stream, decoded)
        except codec.CodecError as exc:
            yield Finding("selftest", PROBLEM, f"{spec.label} {list(shape)} via {path}: {exc}")
            continue
        yield Finding("selftest", OK, f"{spec.label} {list(shape)} via {path}: encode {encoded.encode_ms:.0f} ms, "
                                      f"decode {decode_ms:.0f} ms, {encoded.nbytes:,} bytes ({encoded.ratio:.2f}x "
                                      f"smaller than bf16), cosine {error.cosine:.6f}, rel L2 {error.rel_l2:.2e}")


def check_models(config: DaemonConfig) -> Iterator[Finding]:
    from .model.files import ModelError, ModelStore  # noqa: PLC0415
    from .model.presets import PRESETS  # noqa: PLC0415

    from .model.inventory import inventory_loras, inventory_models, inventory_parts  # noqa: PLC0415
    from .model.lora import LoraStore  # noqa: PLC0415

    store = ModelStore(config.models_dir, config.cache_dir, config.comfyui_dir, config.lora_dir)
    folders = ", ".join(str(d) for d in store.dirs) or "none configured"
    # layout, precision, head parts and the hash the handshake compares, per model; then the VAE and
    # text-encoder files the head can pair with them
    try:
        reports = inventory_models(store, distilled=config.distilled) + inventory_parts(store)
    except ModelError as exc:  # a model folder closed to this user, say
        yield Finding("models", PROBLEM, str(exc))
        reports = None
    if reports == []:
        yield Finding("models", NOTE, f"no model folders in {folders} (the tiny demo model is written there on "
                                      "first use; real checkpoints are your local files)")
    for report in reports or ():  # a broken file nobody configured is worth a note, not a failed check
        yield Finding("models", OK if report.ok else NOTE, report.describe())
    skipped = store.skipped_files() if reports is not None else []  # a ComfyUI tree holds other models' files too: one line, not one each
    if skipped:
        path, why = skipped[0]
        yield Finding("models", NOTE, f"{len(skipped)} other file{'s' if len(skipped) != 1 else ''} in the model "
                                      f"folders not used, e.g. {path} ({why})")
    for report in inventory_loras(LoraStore(config.lora_dirs), config.cache_dir):
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


def check_precision(config: DaemonConfig) -> Iterator[Finding]:
    """The configured model's weights at the precision ``weights`` holds them (layers per format, GiB on the
    device against bf16), and how each device computes fp8 layers (probed: a tiny real fp8 matmul)."""
    import torch  # noqa: PLC0415

    from .model.files import ModelError, ModelStore  # noqa: PLC0415
    from .model.precision import fp8_compute  # noqa: PLC0415
    from .model.presets import PRESETS  # noqa: PLC0415
    from .model.runtime import DTYPES, RandomSource, weight_bytes, weights_label  # noqa: PLC0415

    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        compute = fp8_compute(device)
        yield Finding("fp8", OK if compute.native else NOTE, f"{device}: {compute.describe()}")
    try:
        if config.random_weights:
            preset = PRESETS[config.model]
            formats = RandomSource(preset).linear_formats(config.weights)
        else:
            checkpoint = ModelStore(config.models_dir, config.cache_dir, config.comfyui_dir,
                                    config.lora_dir).open(config.model).checkpoint
            preset, formats = checkpoint.preset, checkpoint.linear_formats(config.weights)
    except (ModelError, KeyError):
        return  # check_models says why
    dtype = DTYPES[config.dtype]
    held = weight_bytes(preset, formats, dtype)
    dense = weight_bytes(preset, {}, torch.bfloat16)
    total, bf16 = (sum(w.blocks) + w.head + w.tail for w in (held, dense))
    kinds = {f.kind for f in formats.values()}
    how = ("; fp8 layers: " + fp8_compute(devices[0]).describe().split(":")[0] if "fp8" in kinds else "") + \
          ("; GGUF layers: dequantised per layer at each forward" if "gguf" in kinds else "")
    yield Finding("weights", OK, f"{config.model} (weights = {config.weights!r}): {weights_label(formats, dtype)}; "
                                 f"{total / 2**30:.1f} GiB on the device (bf16: {bf16 / 2**30:.1f} GiB){how}")


def check_mdns(config: DaemonConfig) -> Iterator[Finding]:
    from .node.discovery import MdnsUnavailable, choose_for, require_zeroconf  # noqa: PLC0415

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
        if not enabled_instances():  # a box with one daemon per GPU runs meshd@N instead (see "instances")
            yield Finding("systemd", NOTE, f"{UNIT_NAME} is not installed (sudo meshd install-unit, or "
                                           "--gpus all for one daemon per GPU)")
        return
    level = OK if active == "active" else PROBLEM if active == "failed" else NOTE
    yield Finding("systemd", level, f"{UNIT_NAME}: {enabled}, {active}"
                  + ("" if active == "active" else " (journalctl -u meshd for why)"))


def enabled_instances(unit_dir: Path = UNIT_DIR) -> list[int]:
    """Instances N of meshd@.service enabled on this box (the symlinks ``systemctl enable`` makes in the
    targets' .wants folders, so this works without a running systemd, on an image too)."""
    found = set()
    for link in unit_dir.glob("*.wants/meshd@*.service"):
        n = link.name.removeprefix("meshd@").removesuffix(".service")
        if n.isdigit():
            found.add(int(n))
    return sorted(found)


def check_instances(config_path: Path | None, unit_dir: Path = UNIT_DIR) -> Iterator[Finding]:
    """One line per instance of meshd@.service (enabled, or configured by a ["meshd@N"] section or a
    meshd@N.toml drop-in): its GPU, port, state directory and node id, and whether systemd runs it."""
    from .config import ConfigError, instances_configured, load_config  # noqa: PLC0415
    from .node.nodeid import read_node_id  # noqa: PLC0415

    enabled = enabled_instances(unit_dir)
    try:
        configured = instances_configured(config_path)
    except ConfigError as exc:
        yield Finding("instances", PROBLEM, str(exc))
        return
    if not enabled and not configured:
        return
    running = shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()
    ports: dict[int, str] = {}
    state_dirs: dict[Path, str] = {}
    for n in sorted(set(enabled) | set(configured)):
        name = f"meshd@{n}"
        try:
            config = load_config(config_path, instance=n)
        except ConfigError as exc:
            yield Finding("instances", PROBLEM, f"{name}: {exc}")
            continue
        node_id = read_node_id(config.state_dir)
        if not running:
            state = "enabled" if n in enabled else "not enabled"
        else:
            state = f"{_systemctl('is-enabled', name + '.service')}, {_systemctl('is-active', name + '.service')}"
        level = OK if n in enabled else NOTE
        clash = []
        if config.port and config.port in ports:
            clash.append(f"port {config.port} is also {ports[config.port]}'s")
        if config.state_dir in state_dirs:
            clash.append(f"state dir {config.state_dir} is also {state_dirs[config.state_dir]}'s (one node id for two daemons)")
        ports.setdefault(config.port, name)
        state_dirs.setdefault(config.state_dir, name)
        if running and state.endswith(", failed"):
            level = PROBLEM
        if clash:
            level = PROBLEM
        yield Finding("instances", level,
                      f"{name}: {config.device}, port {config.port}, {config.model}, blocks {config.blocks}, state "
                      f"{config.state_dir} (node id {node_id or 'not made yet'}); {state}"
                      + (f"; {'; '.join(clash)}" if clash else "")
                      + ("" if n in enabled else f" (sudo systemctl enable --now {name})"))


def check_node_id(config: DaemonConfig) -> Iterator[Finding]:
    from .node.nodeid import read_node_id  # noqa: PLC0415

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
    elif on and shutil.which(os.environ.get("CXX", "c++")) is None:  # what compiler_for looks for too
        yield Finding("compile", PROBLEM, f"compile is on for the CPU, but no C++ compiler ({os.environ.get('CXX', 'c++')}) "
                                          "is on PATH: install one or set compile = false")
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


def run_checks(config: DaemonConfig, *, codecs: bool = True, nvml=None,
               selftest_shape: tuple[int, ...] | None = None) -> list[Finding]:
    """Every check; ``codecs=False`` skips the NVENC/NVDEC probe (it imports torch and opens encoders);
    ``selftest_shape`` adds the HEVC round trip of a stream of that shape."""
    findings: list[Finding] = []
    findings += check_gpus(nvml)
    if codecs:
        findings += check_codecs()
    if selftest_shape is not None:
        findings += selftest(selftest_shape)
    findings += check_models(config)
    if codecs:  # device probes: an fp8 matmul on each GPU
        findings += check_precision(config)
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
