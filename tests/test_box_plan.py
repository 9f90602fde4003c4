"""A box with several GPUs in a split: the planner keeps its GPUs adjacent, so the activations cross
the network once per box, and says which links stay on one box."""

from meshd.model.presets import PRESETS
from meshd.node.info import NodeInfo
from meshd.pipeline.plan import (PeerAddress, PeerResources, box_order, network_crossings, parse_split, propose,
                                 same_host_links)

GiB = 1 << 30
KLEIN = PRESETS["klein-9b"]


def gpu(label: str, host: str, free_gib: int = 40, speed: float = 1.0) -> PeerResources:
    return PeerResources(PeerAddress(f"10.0.0.{ord(label)}", 7777), label, free_gib * GiB, speed, host)


def test_the_gpus_of_one_box_are_kept_together_after_the_head():
    # Found in this order by mDNS: the desktop's two cards interleaved with a laptop's.
    peers = [gpu("A", "desktop"), gpu("L", "laptop"), gpu("B", "desktop"), gpu("M", "laptop"), gpu("X", "")]
    assert [p.label for p in box_order(peers)] == ["A", "B", "L", "M", "X"]
    plan = propose(KLEIN, peers, tokens=4608)
    assert [s.label for s in plan.stages] == ["A", "B", "L", "M", "X"]
    hosts = {p.peer: p.host for p in peers}
    assert same_host_links(plan, hosts) == (True, False, True, False)
    assert network_crossings(plan, hosts) == 2  # in given order it would have crossed 4 times


def test_peers_of_unknown_box_are_each_a_box_of_their_own():
    peers = [gpu("A", ""), gpu("B", ""), gpu("C", "box")]
    assert box_order(peers) == peers
    plan = parse_split("A:0-15,B:16-23,C:24-31", {p.label: p.peer for p in peers}, KLEIN.num_blocks)
    assert same_host_links(plan, {p.peer: p.host for p in peers}) == (False, False)


def test_one_box_with_two_gpus_never_crosses_the_network():
    peers = [gpu("A", "tower", 24, speed=1.6), gpu("B", "tower", 24)]  # a 4090 and a 3090
    plan = propose(KLEIN, peers, tokens=4608)
    assert network_crossings(plan, {p.peer: p.host for p in peers}) == 0
    assert plan.stages[0].blocks > plan.stages[1].blocks  # the faster card takes more blocks


def test_the_dashboard_groups_a_boxs_daemons_and_marks_their_links_same_host():
    from meshd.node.nodeid import host_key  # noqa: PLC0415
    from meshtui.splitting import BlockSpeeds, LinkBook, forecast, propose_plan  # noqa: PLC0415
    from meshtui.views import PeerView  # noqa: PLC0415
    from meshtui.widgets.peer_table import by_box  # noqa: PLC0415

    def view(label: str, boot: str | None, hint: str | None = None) -> PeerView:
        info = {"name": label, "model": {"model_id": "k", "preset": "klein-9b", "hash": "ab" * 32, "dtype": "bfloat16",
                                         "num_blocks": 32}, "memory": {"kind": "gpu", "free": 40 * GiB, "total": 48 * GiB},
                "blocks": [], "host_id": boot}
        base = PeerView(label, PeerAddress(f"10.0.0.{ord(label)}", 7777), hints={"host": hint} if hint else {})
        return base.with_info(NodeInfo.from_wire(info), 0.5, now=0.0) if boot is not None else base

    # A and C: one tower's two daemons (one verified, one only as mDNS hinted); B another box; D unknown.
    views = [view("A", "boot-1"), view("B", "boot-2"), view("C", None, hint=host_key("boot-1")), view("D", "")]
    assert views[0].box == views[2].box == host_key("boot-1") != views[1].box and views[3].box is None
    assert [(v.label, mark) for v, mark in by_box(views)] == [("A", "┌ "), ("C", "└ "), ("B", ""), ("D", "")]

    online = [views[0], view("B", "boot-2"), view("E", "boot-1")]  # found in this order: A, B, E
    plan = propose_plan(online, 4608, BlockSpeeds())
    assert [s.label for s in plan.stages] == ["A", "E", "B"]
    links = [s.link for s in forecast(plan, {v.address: v for v in online}, 1024, 1024, BlockSpeeds(), LinkBook()).stages]
    assert [link.same_host if link else None for link in links] == [True, False, None]


def test_the_headless_plan_line_says_which_links_stay_on_one_box():
    from meshtui.mesh import Mesh  # noqa: PLC0415

    mesh = Mesh(None)
    boots = {"A": "boot-1", "B": "boot-1", "C": "boot-2"}
    for label, boot in boots.items():
        peer = mesh.add(PeerAddress(f"10.0.0.{ord(label)}", 7777))
        peer.info = NodeInfo(host_id=boot)
    plan = parse_split("A:0-15,B:16-23,C:24-31", {p.label: p.address for p in mesh.peers.values()}, KLEIN.num_blocks)
    assert mesh.describe_plan(plan) == "A:0-15 => B:16-23 -> C:24-31 (=> same host)"
