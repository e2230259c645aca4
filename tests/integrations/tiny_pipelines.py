"""Tiny random-weight diffusers pipelines built from configs (no download), for the integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ["a red shoe", "a small bag", "a striped shirt"]


def tiny_tokenizer(directory: Path, max_length: int = 16):
    """A character-level CLIP tokenizer written into ``directory`` (a vocabulary, no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32, sample_size=8,
    )  # fmt: skip


def tiny_sd_pipeline(tmp: Path, seed: int = 0):
    """A Stable-Diffusion-shaped pipeline: CLIP text encoder, UNet2DConditionModel with cross-attention, VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    text_encoder = CLIPTextModel(config)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them (DiT's label dropout is live in train mode)
    return pipe


def tiny_dit_pipeline(seed: int = 0):
    """A DiT pipeline: class-conditional DiTTransformer2DModel (adaLN-zero) on 8x8x4 latents, VAE."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32,
    )  # fmt: skip
    # adaLN-zero starts every block at identity; give the tiny random model some signal to quantize
    with torch.no_grad():
        for p in transformer.parameters():
            if p.ndim >= 1 and not p.any():
                p.normal_(0, 0.02)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them (DiT's label dropout is live in train mode)
    return pipe


def tiny_unet2d():
    """A class-conditional pixel-space UNet2DModel with attention (a bare model, no pipeline)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, num_class_embeds=10,
    )  # fmt: skip


def save_tiny(kind: str, directory: Path) -> Path:
    """Write a tiny diffusers folder as ``save_pretrained`` does: ``sd`` or ``dit`` (pipelines), ``unet``
    (the SD pipeline's bare UNet2DConditionModel) or ``unet2d`` (a bare UNet2DModel)."""
    if kind == "sd":
        tiny_sd_pipeline(directory.parent / f".{directory.name}-tokenizer").save_pretrained(str(directory))
    elif kind == "dit":
        tiny_dit_pipeline().save_pretrained(str(directory))
    elif kind == "unet":
        tiny_sd_pipeline(directory.parent / f".{directory.name}-tokenizer").unet.save_pretrained(str(directory))
    elif kind == "unet2d":
        tiny_unet2d().save_pretrained(str(directory))
    else:
        raise ValueError(kind)
    return directory
