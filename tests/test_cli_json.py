"""``meshtui generate --json`` is read by scripts: its output is pinned byte for byte.

The summary below has the shape a head sends (stage infos with half-open blocks, hop records with
inclusive blocks, a hop with its reconstruction error and an encoder note); the printed JSON is the
golden file beside these tests. A change to it is a change to a public format: make it on purpose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshtui.cli import _finish

GOLDEN = Path(__file__).parent / "golden" / "generate-json.txt"

HOP = {"node": "b", "from": "a", "blocks": [3, 5], "codec": "fp8", "bytes": 9216, "raw_bytes": 18432,
       "encode_ms": 0.412, "chunks": 1, "wire_ms": 1.25, "decode_ms": 0.301, "compute_ms": 4.5,
       "error": {"cosine": 0.99991, "rel_l2": 0.0121, "max_abs": 0.03125}}
SUMMARY = {
    "params": {"prompt": "a lighthouse", "seed": 7, "width": 64, "height": 64, "steps": 2, "guidance": 4.0,
               "loras": []},
    "model": {"model_id": "tiny", "preset": "tiny", "hash": "3f2a", "dtype": "bfloat16"},
    "prepare_ms": 12.5, "compile_s": 0, "compiled": False, "decode_ms": 30.25, "total_s": 1.5,
    "steps": [
        {"step": 0, "ms": 20.0, "head_ms": 1.5,
         "passes": [{"compute_ms": 3.25, "hops": [{**HOP, "encoder_note": "u8 -> fp8: the link slowed"}]}]},
        {"step": 1, "ms": 21.0, "head_ms": 1.0, "passes": [{"compute_ms": 3.75, "hops": [{**HOP, "bytes": 9000}]}]},
    ],
    "plan": "A:0-2 -> B:3-5",
    "stages": [{"peer": "127.0.0.1:7001", "node": "a", "blocks": [0, 3], "link": {"to": "127.0.0.1:7002"}},
               {"peer": "127.0.0.1:7002", "node": "b", "blocks": [3, 6], "link": None}],
    "head": "a",
    "mode": "split",
}


def test_generate_json_prints_the_summary_exactly_as_before(capsys):
    args = argparse.Namespace(out=None, json=True)
    assert _finish(args, b"\x89PNG", SUMMARY) == 0
    out, err = capsys.readouterr()
    assert out == GOLDEN.read_text(encoding="utf-8")
    assert "a -> b: fp8 9108 B/step" in err  # the human summary goes to stderr, never into the JSON
