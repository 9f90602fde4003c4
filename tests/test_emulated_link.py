"""--emulate-link shapes the links between daemons, not a client's own connection to its head."""

import time

from meshd.wire.channel import Channel
from tests.daemons import running_daemon

KEY = bytes(range(32))


async def echo_seconds(channel: Channel) -> float:
    await channel.request("echo")  # the first burst
    time.sleep(0.3)  # longer than the delay: the next burst pays it again
    t0 = time.perf_counter()
    await channel.request("echo")
    return time.perf_counter() - t0


async def test_a_daemon_link_is_shaped_and_a_client_connection_is_not(tmp_path):
    async with running_daemon(tmp_path, KEY, emulate_link="10gbit,200ms") as daemon:
        client = await Channel.connect(*daemon.bound, KEY, hello={"node": "meshtui"})
        peer = await Channel.connect(*daemon.bound, KEY, hello={"node": "b", "daemon": True})
        try:
            assert await echo_seconds(client) < 0.1
            assert await echo_seconds(peer) >= 0.2  # the daemon's reply waits out the emulated delay
        finally:
            await client.close()
            await peer.close()
