#!/usr/bin/env python3
"""The generation's tail, part by part: the VAE decode (eager, channels-last, compiled), the pixels'
conversion (diffusers' postprocess on the host vs ours on the device) and the PNG (PIL vs ours).

    python bench/decode_bench.py --model klein-9b --size 1024 --json

Random VAE weights (the model's preset): the timings do not depend on the values, and the image is
noise, the worst case for the PNG's deflate. A second, smooth image stands in for a real picture's
PNG size. Everything the tail does outside the steps is here except the latents' unpacking (<1 ms).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import median_ms  # noqa: E402
from meshd.model.compiled import INDUCTOR_OPTIONS  # noqa: E402
from meshd.model.files import ModelStore  # noqa: E402
from meshd.model.runtime import open_source  # noqa: E402
from meshd.pipeline.generation import to_pixels  # noqa: E402
from meshd.pipeline.png import encode_png  # noqa: E402

HOST = torch.device("cpu")  # the PNG's timings: host work, nothing to wait for


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="klein-9b")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--vae", choices=["all", "eager", "none"], default="all",
                        help="time the VAE eager, channels-last and compiled (all), eager only, or not at all "
                             "(none: the tail after it, on a random decoded image; a CPU takes minutes per VAE)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    source = open_source(args.model, ModelStore([Path("/nonexistent")]), random_weights=True)
    vae = source.vae(device, torch.bfloat16)
    scale = source.preset.vae_scale_factor
    channels = int(source.preset.vae["latent_channels"])
    latents = torch.randn(1, channels, args.size // scale, args.size // scale, device=device, dtype=torch.bfloat16)
    out: dict = {"model": args.model, "size": args.size, "device": torch.cuda.get_device_name(device)
                 if device.type == "cuda" else platform.processor() or "cpu", "weights": "random"}

    def decode():
        return vae.decode(latents, return_dict=False)[0]

    if args.vae == "none":
        reference = torch.rand(1, 3, args.size, args.size, device=device, dtype=torch.bfloat16) * 2 - 1
    else:
        out["vae_eager_ms"], _, reference = median_ms(decode, device, args.repeat)
    if args.vae == "all":
        vae.to(memory_format=torch.channels_last)
        out["vae_channels_last_ms"], _, last = median_ms(decode, device, args.repeat)
        out["channels_last_max_abs_diff"] = float((last.float() - reference.float()).abs().max())
        vae.to(memory_format=torch.contiguous_format)
        eager_decoder = vae.decoder
        vae.decoder = torch.compile(eager_decoder, dynamic=False, options=INDUCTOR_OPTIONS)
        t0 = time.perf_counter()
        decode()
        out["vae_compile_s"] = time.perf_counter() - t0
        out["vae_compiled_ms"], _, compiled = median_ms(decode, device, args.repeat)
        out["compiled_max_abs_diff"] = float((compiled.float() - reference.float()).abs().max())
        vae.decoder = eager_decoder

    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor  # noqa: PLC0415
    processor = Flux2ImageProcessor(vae_scale_factor=scale * 2)
    out["postprocess_diffusers_ms"], _, theirs = median_ms(lambda: processor.postprocess(reference, output_type="pil")[0],
                                                      device, args.repeat)
    out["to_pixels_ms"], _, ours = median_ms(lambda: to_pixels(reference)[0], device, args.repeat)
    out["pixels_identical"] = bool(np.array_equal(np.asarray(theirs), ours))

    y, x = np.mgrid[0:args.size, 0:args.size]
    rng = np.random.default_rng(0)
    smooth = np.clip(np.stack([x // 4, y // 4, (x + y) // 8], -1) % 256 + rng.integers(-3, 4, (args.size, args.size, 3)),
                     0, 255).astype(np.uint8)
    for name, pixels in (("noise", ours), ("smooth", smooth)):
        image = Image.fromarray(pixels)

        def pil(image=image):
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            return buf.getvalue()

        out[f"png_pil_{name}_ms"] = median_ms(pil, HOST, args.repeat)[0]
        out[f"png_ours_{name}_ms"] = median_ms(lambda pixels=pixels: encode_png(pixels), HOST, args.repeat)[0]
        out[f"png_pil_{name}_bytes"] = len(pil())
        out[f"png_ours_{name}_bytes"] = len(encode_png(pixels))
    out["cpu_count"] = os.cpu_count()
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
