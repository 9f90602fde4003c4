"""LoRAs over the wire: every daemon applies its own copy (found by hash) to its own blocks; a split
generation with a LoRA equals the all-local one with it; a peer without the file refuses by name."""

import argparse
import asyncio
import shutil

import numpy as np
import pytest
import torch

from meshd.auth import read_key
from meshd.errors import MeshError
from meshd.pipeline.request import LoraByName
from meshd.model.checkpoints import expected_shapes
from meshd.model.presets import PRESETS
from meshtui.cli import run_local
from meshtui.local import LocalCluster
from tests.test_lora import make_factors, write_kohya, write_peft
from tests.daemons import split_generation
from tests.test_split_generation import pixels

PARAMS = {"prompt": "a red kite over a beach", "seed": 5, "width": 64, "height": 64, "steps": 3, "guidance": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-wire")
    shapes = {n[: -len(".weight")]: s for n, s in expected_shapes(PRESETS["tiny"]).items() if len(s) == 2}
    head_loras, tail_loras, bare = root / "loras-a", root / "loras-b", root / "loras-c"
    for folder in (head_loras, tail_loras, bare):
        folder.mkdir()
    write_peft(head_loras / "kite-style.safetensors", make_factors(shapes, 7))
    # The other peer has the same file under another name: it is found by its hash.
    shutil.copy(head_loras / "kite-style.safetensors", tail_loras / "renamed.safetensors")
    write_kohya(bare / "something-else.safetensors", make_factors(shapes, 8))
    with LocalCluster(workdir=root / "cluster", models_dir=root / "models",
                      common_args=["--model", "tiny", "--device", "cpu"]) as cluster:
        cluster.add("a", "--lora-dir", str(head_loras))
        cluster.add("b", "--lora-dir", str(tail_loras))
        cluster.add("c", "--lora-dir", str(bare))
        cluster.start()
        yield {"cluster": cluster, "head_loras": head_loras, "models": root / "models"}


async def split(cluster, spec: str, loras: list[dict]):
    return await split_generation(read_key(cluster.key_file), [d.address for d in cluster.daemons], spec,
                                  {**PARAMS, "loras": tuple(LoraByName(**lora) for lora in loras)}, codec="raw",
                                  return_latents=True)


def local(world, lora: list[str]) -> np.ndarray:
    args = argparse.Namespace(device="cpu", models_dir=[world["models"]], model="tiny", random_weights=False,
                              size=(64, 64), steps=3, guidance=1.0, prompt=PARAMS["prompt"], seed=PARAMS["seed"],
                              lora=lora, lora_dir=[world["head_loras"]])
    png, _ = asyncio.run(run_local(args))
    return pixels(png)


def test_split_with_a_lora_equals_all_local_with_it(world):
    with_lora = asyncio.run(split(world["cluster"], "A:0-2,B:3-5", [{"name": "kite-style", "strength": 0.8}]))
    assert np.array_equal(pixels(with_lora.png), local(world, ["kite-style:0.8"]))
    plain = asyncio.run(split(world["cluster"], "A:0-2,B:3-5", []))
    assert not np.array_equal(pixels(plain.png), pixels(with_lora.png))  # the LoRA did something
    assert np.array_equal(pixels(plain.png), local(world, []))  # and the daemons dropped it again


def test_peer_missing_the_lora_refuses_naming_it(world):
    with pytest.raises(MeshError, match=r"c cannot apply the LoRAs: .*kite-style") as info:
        asyncio.run(split(world["cluster"], "A:0-2,C:3-5", [{"name": "kite-style", "strength": 1.0}]))
    assert info.value.code == "not-found"


def test_head_without_the_named_lora_refuses(world):
    with pytest.raises(MeshError, match="no-such-lora"):
        asyncio.run(split(world["cluster"], "B:0-2,A:3-5", [{"name": "no-such-lora", "strength": 1.0}]))
