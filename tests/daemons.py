"""In-process daemons on loopback for tests (real sockets, real handshake, real tiny model)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from pathlib import Path

import torch

from meshd import limits
from meshd.config import DaemonConfig
from meshd.wire.channel import Channel
from meshd.auth import generate_key
from meshd.wire.connection import Connection, address_name, client_handshake, connect_socket, server_handshake
from meshd.errors import MeshError
from meshd.pipeline.request import GenerationParams
from meshd.model.compiled import BlockCompiler, CompileCache
from meshd.model.files import ModelStore
from meshd.model.runtime import HostedModel, open_source
from meshd.pipeline.plan import PeerAddress, parse_split
from meshd.node.daemon import Daemon
from meshtui.mesh import GenerationOutcome, Mesh


async def split_generation(key: bytes, addresses, spec: str, params: dict, **generate) -> GenerationOutcome:
    """One generation over daemons at ``addresses`` (labelled A, B, ... in order) with the plan ``spec``,
    the way ``meshtui generate --split SPEC`` runs it: connect, load the plan, generate."""
    mesh = Mesh(key)
    try:
        for address in addresses:
            mesh.add(address if isinstance(address, PeerAddress) else PeerAddress(*address))
        await mesh.connect_all()
        preset = mesh.model()
        plan = parse_split(spec, {p.label: p.address for p in mesh.peers.values()}, preset.num_blocks)
        await mesh.apply(plan)
        return await mesh.generate(plan, GenerationParams(**params), **generate)
    finally:
        await mesh.close()


@contextlib.asynccontextmanager
async def running_daemon(tmp: Path, key: bytes | None, blocks=(), models_dir: Path | None = None, model: str = "tiny",
                         device: str = "cpu", compile_backend: str | None = None, **config):
    """A daemon in this process; ``compile_backend`` (torch.compile's, e.g. "aot_eager") compiles its blocks."""
    models = models_dir or tmp / "models"
    cfg = DaemonConfig(host="127.0.0.1", port=0, device=device, models_dir=(models,), state_dir=tmp / "state",
                       mdns=False, insecure=key is None, **config)
    source = open_source(model, ModelStore([models]))
    compiler = (BlockCompiler(CompileCache(cfg.state_dir / "compile"), source.model_id, backend=compile_backend)
                if compile_backend else None)
    model = HostedModel(source, torch.device(device), torch.bfloat16, weights=cfg.weights, compiler=compiler)
    blocks = sorted(blocks)
    if blocks:
        with torch.inference_mode():
            model.load(blocks, 0 in blocks, model.preset.num_blocks - 1 in blocks)
    daemon = Daemon(cfg, model, key)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop(grace=2)


async def server_side_of(stream: bytes, key: bytes | None) -> MeshError | dict:
    """Feed ``stream`` to a server handshake over a socket pair; return its error, or the hello it let in."""
    ours, theirs = socket.socketpair()
    try:
        conn = Connection(ours, "fuzzer")
        handshake = asyncio.ensure_future(server_handshake(conn, key, lambda: {"name": "fuzzed"}))
        theirs.sendall(stream)
        theirs.shutdown(socket.SHUT_WR)
        try:
            return await asyncio.wait_for(handshake, limits.HANDSHAKE_TIMEOUT_S + 1)
        except MeshError as exc:
            return exc
    finally:
        ours.close()
        theirs.close()


async def jobs_on(key: bytes, address: PeerAddress) -> int:
    """The prepared jobs a daemon holds, as its ``info`` says (asked on a fresh connection)."""
    channel = await Channel.connect(address.host, address.port, key)
    try:
        return (await channel.request("info")).header["node"]["jobs"]
    finally:
        await channel.close()


async def sealed_pair(key: bytes | None = None) -> tuple[Connection, Connection]:
    """A client and a server connection over loopback TCP, through the real handshake (sealed)."""
    key = key or generate_key()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    accepted = asyncio.ensure_future(loop.sock_accept(listener))
    client = Connection(await connect_socket(*listener.getsockname()[:2]), "server")
    served_sock, addr = await accepted
    listener.close()
    served = Connection(served_sock, address_name(addr))
    await asyncio.gather(client_handshake(client, key), server_handshake(served, key, lambda: {}))
    assert client.sealed and served.sealed
    return client, served


async def eventually(condition, seconds: float = 2.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        gc.collect()
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()
