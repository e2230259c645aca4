"""``fashion-sd``: a built-in text-to-image latent diffusion pipeline (Stable Diffusion's layout, small).

    pipe = load_fashion_sd()                        # diffusers StableDiffusionPipeline, fp32, CPU
    image = pipe("a photo of an ankle boot", guidance_scale=3.0).images[0]

Components, all diffusers / transformers classes so the folder loads with
``StableDiffusionPipeline.from_pretrained(path)`` offline: an ``AutoencoderKL`` (1 channel, 32 x 32
pixels <-> 4 x 8 x 8 latents), a ``CLIPTextModel`` with a BPE tokenizer built here from the caption
vocabulary (:func:`build_tokenizer`: every caption word is one token, any other text falls back to
letters), a ``UNet2DConditionModel`` with cross-attention, and Stable Diffusion's DDIM schedule.
Trained by ``diffquant train sd`` (:func:`diffquant.train.train_sd`) on Fashion-MNIST padded to 32 x 32
with templated captions (:func:`caption`): the class, and the item's tone and texture where the image
supports them (tertiles within its class: "dark" / "light", "plain" / "patterned"); the caption is
dropped (the empty prompt, as the pipeline's negative prompt) a tenth of the time, for guidance.

diffusers and transformers are imported inside the functions only.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

NAME = "fashion-sd"
# the nouns a caption may name each class by (the first is the one evaluation prompts use)
CLASS_NOUNS = (
    ("t-shirt", "top"),
    ("pair of trousers", "trousers"),
    ("pullover", "sweater"),
    ("dress",),
    ("coat", "jacket"),
    ("sandal",),
    ("shirt",),
    ("sneaker", "trainer"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)
PLURAL = frozenset({"trousers"})
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "{} on a black background")
TONES = ("dark", None, "light")  # tertiles of the item's mean intensity within its class
TEXTURES = ("plain", None, "patterned")  # tertiles of the item's mean |Laplacian| within its class
GUIDANCE = 3.0  # the classifier-free guidance scale of its evaluation (and of its calibration)
EXTRA_WORDS = ("a", "an", "of", "the", "photo", "picture", "image", "on", "black", "background")


def config() -> dict:
    """The shipped config (``models/configs/fashion-sd.json``)."""
    return json.loads(resources.files("diffquant.models").joinpath("configs", f"{NAME}.json").read_text())


def pipeline_dir() -> Path:
    """Where the shipped pipeline folder lives (``models/weights/fashion-sd``)."""
    return Path(str(resources.files("diffquant.models").joinpath("weights", NAME)))


def prompt(label: int, adjectives: tuple[str, ...] = (), noun: int = 0, template: int = 1) -> str:
    """A caption: ``prompt(9) == "a photo of an ankle boot"``, ``prompt(1, ("dark",)) == "a photo of a dark
    pair of trousers"``, ``prompt(1, ("dark",), noun=1) == "a photo of dark trousers"`` (a plural, no article)."""
    name = CLASS_NOUNS[label][noun]
    words = " ".join((*adjectives, name))
    phrase = words if name in PLURAL else ("an " if words[0] in "aeiou" else "a ") + words
    return TEMPLATES[template].format(phrase)


def caption(label: int, tone: int, texture: int, g: torch.Generator) -> str:
    """A random caption of an image of class ``label`` with tone / texture tertiles ``tone``, ``texture``
    (0, 1, 2): each attribute the image has (not the middle tertile) named with probability 1/2."""
    r = torch.rand(2, generator=g).tolist()
    adjectives = tuple(
        a for a, keep in ((TEXTURES[texture], r[0] < 0.5), (TONES[tone], r[1] < 0.5)) if a is not None and keep
    )
    noun = int(torch.randint(len(CLASS_NOUNS[label]), (1,), generator=g))
    template = int(torch.randint(len(TEMPLATES), (1,), generator=g))
    return prompt(label, adjectives, noun, template)


def vocabulary() -> list[str]:
    """Every word a caption can hold (CLIP's pre-tokenizer splits "t-shirt" into "t", "-", "shirt")."""
    words = set(EXTRA_WORDS) | {a for a in TONES + TEXTURES if a}
    for nouns in CLASS_NOUNS:
        for noun in nouns:
            words |= set(noun.replace("-", " ").split())
    return sorted(words)


def attributes(images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tone, texture)`` tertiles (0, 1, 2) of each image (``(N, 28, 28)`` or ``(N, 1, 28, 28)`` uint8) within its class: the mean intensity of the
    item's pixels (those above 10 % of full scale) and their mean absolute Laplacian."""
    x = images_u8.float().div(255.0).reshape(images_u8.shape[0], 1, *images_u8.shape[-2:])
    item = x > 0.1
    count = item.sum(dim=(1, 2, 3)).clamp_min(1)
    brightness = (x * item).sum(dim=(1, 2, 3)) / count
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(x, kernel, padding=1).abs()
    texture = (lap * item).sum(dim=(1, 2, 3)) / count
    out = []
    for value in (brightness, texture):
        tertile = torch.empty(len(labels), dtype=torch.long)
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            rank = value[idx].argsort().argsort()
            tertile[idx] = (rank * 3) // len(idx)
        out.append(tertile)
    return out[0], out[1]


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) learned on ``words`` (each once, CLIP's ``</w>`` end
    mark) until every word is one symbol; ties go to the lexicographically first pair, so the list
    is deterministic. Encoding a listed word with these merges in rank order gives the word itself."""
    symbols = [(*w[:-1], w[-1] + "</w>") for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in symbols:
            for pair in itertools.pairwise(s):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = []
        for s in symbols:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            joined.append(tuple(out))
        symbols = joined


def build_tokenizer(directory: str | os.PathLike, max_length: int):
    """A ``CLIPTokenizer`` written into ``directory`` (``vocab.json``, ``merges.txt``): the two special
    tokens, letters, digits and punctuation (alone and word-final), and the :func:`bpe_merges` of
    :func:`vocabulary`, so every caption word is one token and other words spell out."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789-,.!?'/&":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = bpe_merges(vocabulary())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def build_components(cfg: dict, tokenizer_dir: str | os.PathLike) -> dict:
    """Randomly initialised components of the config (the caller seeds torch): ``vae``, ``text_encoder``,
    ``tokenizer``, ``unet``, ``scheduler``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tokenizer_dir, cfg["text_encoder"]["max_position_embeddings"])
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), bos_token_id=0, eos_token_id=1, pad_token_id=1, **cfg["text_encoder"]
    )
    return {
        "vae": AutoencoderKL(**cfg["vae"]),
        "text_encoder": CLIPTextModel(text_config),
        "tokenizer": tokenizer,
        "unet": UNet2DConditionModel(**cfg["unet"]),
        "scheduler": DDIMScheduler(**cfg["scheduler"]),
    }


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids as the pipeline makes them (padded to the model length, truncated)."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def pad_images(x: torch.Tensor, pad: int) -> torch.Tensor:
    """28 x 28 images in [-1, 1] -> 32 x 32 on the black background (-1)."""
    return F.pad(x, (pad,) * 4, value=-1.0)


def crop_images(x: torch.Tensor, pad: int) -> torch.Tensor:
    """The inverse of :func:`pad_images` (decoded 32 x 32 -> the 28 x 28 the classifier reads)."""
    return x[..., pad : x.shape[-2] - pad, pad : x.shape[-1] - pad]


def save_pipeline(components: dict, directory: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write a ``StableDiffusionPipeline`` of ``components`` in ``save_pretrained``'s layout (weights in
    ``dtype``, safetensors), into a temporary folder renamed onto ``directory`` when complete."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.to(dtype)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.replace(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    pipe.to(torch.float32)
    return directory


def load_fashion_sd(path: str | os.PathLike | None = None):
    """The shipped ``fashion-sd`` pipeline (or the one saved at ``path``), fp32, eval mode, CPU.

    Raises:
        FileNotFoundError: no pipeline folder there (train and export one with ``diffquant train sd``).
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else pipeline_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no fashion-sd pipeline at {folder} (model_index.json missing): train and export it with "
            "`diffquant train sd --out DIR`, or reinstall diffquant"
        )
    from diffquant.integrations.quiet import quiet_loading

    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    n: int,
    steps: int = 50,
    guidance_scale: float = GUIDANCE,
    seed: int = 0,
    batch_size: int = 100,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the evaluation protocol from a ``fashion-sd`` pipeline (FP or quantized): sample ``i``
    is prompted with its class's :func:`prompt` (classes balanced, ``(start + i) % 10``) and starts from
    the latent noise of generator ``(seed, start + i)`` (:func:`diffquant.sampling.sample_generators`),
    so two pipelines given the same arguments start from identical noise.

    Returns:
        ``(images, labels)``: ``(n, 1, 28, 28)`` in ``[-1, 1]`` (the 32 x 32 output cropped to the
        Fashion-MNIST frame) and the class each prompt names.
    """
    from diffquant.sampling import balanced_labels, sample_generators

    labels = balanced_labels(n, len(CLASS_NOUNS), start)
    size = pipe.vae.config.sample_size // pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, size, size)
    gens = sample_generators(seed, range(start, start + n))
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
    out = []
    for lo in range(0, n, batch_size):
        texts = [prompt(int(c)) for c in labels[lo : lo + batch_size]]
        images = pipe(
            texts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents[lo : lo + batch_size],
            height=pipe.vae.config.sample_size, width=pipe.vae.config.sample_size, output_type="pt",
        ).images  # fmt: skip
        out.append(crop_images(images.float() * 2 - 1, (pipe.vae.config.sample_size - 28) // 2))
    return torch.cat(out), labels
