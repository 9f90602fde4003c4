"""sd_notify(3) in plain Python: tell systemd that meshd is ready, alive, or stopping.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, and no call ever raises: a daemon
must not fail because its supervisor is absent or went away (gunicorn's systemd helper does the
same). Abstract socket names (``@name``) are supported. Protocol: one datagram of
``KEY=VALUE`` lines per message, sent to the unix socket named by ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

#: systemd wants a ping at least every WatchdogSec; sd_watchdog_enabled(3) advises half of it.
WATCHDOG_FRACTION = 0.5
#: STATUS= text longer than this is cut (systemctl status shows one line).
MAX_STATUS_CHARS = 200

#: A health check returns None when all is well, or a reason in plain words.
HealthCheck = Callable[[], "str | None"]


def _socket_address(value: str | None) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    log.debug("ignoring %s=%r: neither a path nor an abstract name", NOTIFY_SOCKET_ENV, value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings, or None when systemd does not watch this process."""
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get(WATCHDOG_PID_ENV)
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (we were started by the main one)
    return usec / 1e6 * WATCHDOG_FRACTION


class Notifier:
    """Where to send notifications, read once from the environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get(NOTIFY_SOCKET_ENV))
        self.watchdog_interval = _watchdog_interval(env) if self.address else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send one message (``notify(READY=1, STATUS="...")``); True if it was delivered."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", " ".join(fields), exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **_status(status)) if status else self.notify(READY=1)

    def status(self, text: str) -> bool:
        return self.notify(**_status(text))

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, **_status(status)) if status else self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    async def keep_alive(self, healthy: HealthCheck) -> None:
        """Ping the watchdog every half of ``WatchdogSec`` while ``healthy()`` returns None.

        When the check names a problem, pings stop (so systemd restarts a wedged daemon) and the
        reason goes to STATUS; pings resume if it recovers. Runs until cancelled; returns at once
        when systemd does not watch this process.
        """
        if self.watchdog_interval is None:
            return
        failing: str | None = None
        while True:
            problem = healthy()
            if problem is None:
                if failing is not None:
                    log.warning("healthy again (was: %s); watchdog pings resume", failing)
                self.watchdog()
            elif problem != failing:
                log.error("unhealthy: %s; withholding watchdog pings so systemd can restart meshd", problem)
                self.status(f"unhealthy: {problem}")
            failing = problem
            await asyncio.sleep(self.watchdog_interval)


def _status(text: str) -> dict[str, str]:
    one_line = " ".join(text.split())
    return {"STATUS": one_line[:MAX_STATUS_CHARS]}
