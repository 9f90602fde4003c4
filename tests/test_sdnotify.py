"""systemd sees meshd's life: READY=1 only once it serves, WATCHDOG=1 while healthy, STOPPING=1 on
SIGTERM; and outside systemd nothing happens and nothing breaks. Real unix datagram sockets."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
import time

import pytest

from meshd.auth import read_key
from meshd.wire.channel import Channel
from meshd.node.sdnotify import Notifier
from meshtui.local import LocalCluster


@contextlib.contextmanager
def notify_socket(abstract: bool = False):
    """A bound datagram socket like the one systemd passes in NOTIFY_SOCKET; yields (socket, env value)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    folder = tempfile.mkdtemp(prefix="fm-notify-", dir="/tmp")  # short: unix socket paths are limited to 108 bytes
    try:
        if abstract:
            name = f"fm-notify-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind(b"\0" + name.encode())
            yield sock, "@" + name
        else:
            path = os.path.join(folder, "notify")
            sock.bind(path)
            yield sock, path
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, "notify"))
        os.rmdir(folder)


def receive(sock: socket.socket, timeout: float) -> dict[str, str] | None:
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return None
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_outside_systemd_every_call_is_a_quiet_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("serving") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval is None


def test_a_vanished_notify_socket_never_raises():
    notifier = Notifier({"NOTIFY_SOCKET": "/tmp/fm-no-such-dir/notify"})
    assert notifier.enabled
    assert notifier.ready() is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_arrive_as_key_value_lines(abstract):
    with notify_socket(abstract) as (sock, address):
        notifier = Notifier({"NOTIFY_SOCKET": address})
        assert notifier.ready("serving blocks 0-15\nof klein-9b") is True
        assert receive(sock, 2) == {"READY": "1", "STATUS": "serving blocks 0-15 of klein-9b"}
        notifier.stopping()
        assert receive(sock, 2) == {"STOPPING": "1"}


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us():
    base = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier({**base, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({**base, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier({**base, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None  # no socket: nobody to ping


async def test_watchdog_pings_stop_while_unhealthy_and_resume_after():
    with notify_socket() as (sock, address):
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
        problem: list[str | None] = [None]
        task = asyncio.ensure_future(notifier.keep_alive(lambda: problem[0]))
        try:
            await asyncio.sleep(0.2)
            got = [receive(sock, 0.5) for _ in range(2)]
            assert got == [{"WATCHDOG": "1"}] * 2
            problem[0] = "telemetry sampler silent for 40 s"
            await asyncio.sleep(0.2)
            while (message := receive(sock, 0.01)) is not None and message == {"WATCHDOG": "1"}:
                pass  # pings sent before the check turned bad
            assert message == {"STATUS": "unhealthy: telemetry sampler silent for 40 s"}
            await asyncio.sleep(0.2)
            assert receive(sock, 0.01) is None  # no pings while unhealthy: systemd will restart us
            problem[0] = None
            await asyncio.sleep(0.15)
            assert receive(sock, 0.5) == {"WATCHDOG": "1"}
        finally:
            task.cancel()


def test_daemon_says_ready_only_once_it_serves_and_stopping_on_sigterm(tmp_path):
    """The real daemon, under a real notify socket: at READY=1 the port answers an authenticated
    request and the span given by --blocks is already loaded; WATCHDOG=1 follows; SIGTERM brings
    STOPPING=1 and a clean exit."""
    with notify_socket() as (sock, address), LocalCluster(workdir=tmp_path, common_args=["--device", "cpu"]) as cluster:
        daemon = cluster.add("notified", "--blocks", "0-2",
                             env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
        daemon.start()
        messages = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = receive(sock, 1)
            if message is not None:
                messages.append(message)
                if message.get("READY") == "1":
                    break
            assert daemon.process.poll() is None, daemon.log_tail()
        else:
            pytest.fail(f"no READY=1 within 120 s; got {messages}\n{daemon.log_tail()}")

        # At this very moment the daemon must already serve, with its span loaded.
        ready = json.loads((tmp_path / "notified.ready").read_text())

        async def ask() -> dict:
            channel = await Channel.connect("127.0.0.1", ready["port"], read_key(cluster.key_file))
            try:
                return (await channel.request("info")).header["node"]
            finally:
                await channel.close()

        info = asyncio.run(ask())
        assert info["blocks"] == [[0, 3]]
        assert info["node_id"] == ready["node_id"]
        assert "serving blocks 0-2 of tiny" in messages[-1]["STATUS"]
        assert any(m.get("STATUS") == "starting" for m in messages[:-1]), messages

        pings = [receive(sock, 2) for _ in range(2)]
        assert pings == [{"WATCHDOG": "1"}] * 2

        daemon.signal(signal.SIGTERM)
        after = []
        while (message := receive(sock, 10)) is not None:
            after.append(message)
            if message.get("STOPPING") == "1":
                break
        assert any(m.get("STOPPING") == "1" for m in after), after
        assert daemon.process.wait(30) == 0, daemon.log_tail()
        assert not any(m.get("READY") for m in after)
