"""Time one training step of candidate built-in model architectures (how they were sized).

    python benchmarks/training_speed.py                 # all candidates
    python benchmarks/training_speed.py unet64-128-l1   # one

Prints params and the median seconds per AdamW step at batch 128 (steps 2-5 of 5, random data).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from diffquant.models.denoisers import FashionDiT, FashionUNet


def unet(channels, layers):
    return FashionUNet(
        dict(
            sample_size=14,
            in_channels=4,
            out_channels=4,
            block_out_channels=channels,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=layers,
            num_class_embeds=11,
            attention_head_dim=32,
            norm_num_groups=32,
        ),
        pixel_unshuffle=2,
    )


def dit(patch, width, depth, heads=4):
    return FashionDiT(
        dict(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=1,
            out_channels=1,
            num_layers=depth,
            sample_size=28,
            patch_size=patch,
            num_embeds_ada_norm=10,
        )
    )


CANDIDATES = {
    "unet64-128-l1": lambda: unet((64, 128), 1),
    "unet64-128-l2": lambda: unet((64, 128), 2),
    "unet96-192-l2": lambda: unet((96, 192), 2),
    "dit-p4-w128-d6": lambda: dit(4, 128, 6),
    "dit-p2-w128-d6": lambda: dit(2, 128, 6),
    "dit-p4-w192-d8": lambda: dit(4, 192, 8, heads=6),
    "dit-p2-w96-d6": lambda: dit(2, 96, 6, heads=3),
}


def main(names):
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128")
    for name in names or CANDIDATES:
        model = CANDIDATES[name]()
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        x, t, y = torch.randn(128, 1, 28, 28), torch.randint(0, 1000, (128,)), torch.randint(0, 10, (128,))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            loss = F.mse_loss(model(x, t, y), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:16s} {params:5.2f}M params {sorted(times[1:])[1]:.2f} s/step", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
