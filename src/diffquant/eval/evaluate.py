"""The fixed evaluation protocol: sample, then FD / class consistency against shipped statistics.

Example:
    >>> from diffquant.eval import evaluate
    >>> from diffquant.models import load_builtin
    >>> result = evaluate(load_builtin("fashion-unet"), n=1000, steps=50)   # doctest: +SKIP
    >>> result["fd"], result["class_consistency"]                             # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from diffquant.eval.distributed import cat_gathered, gather, rank_and_world, shard
from diffquant.eval.fd import GaussianStats, feature_stats, frechet_distance
from diffquant.eval.metrics import psnr_per_image, sqnr
from diffquant.models.builtin import load_builtin, load_state_file, package_dir

TRAIN_STATS_FILE = "fashion-features-train-stats.safetensors"


def train_stats_path() -> Path:
    """The shipped feature statistics of the Fashion-MNIST training set (60,000 images)."""
    return package_dir() / "weights" / TRAIN_STATS_FILE


def load_reference() -> dict:
    """Shipped facts about the feature network: test accuracy and the real-data FD floor per N."""
    import json

    path = package_dir() / "weights" / "fashion-features-reference.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall diffquant or run `diffquant train features`.")
    return json.loads(path.read_text())


def load_train_stats() -> GaussianStats:
    """Shipped mean and covariance of ``fashion-features`` features over the training set."""
    return GaussianStats.from_tensors(load_state_file(train_stats_path()))


@torch.no_grad()
def extract_features(feature_net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate ``fashion-features`` activations of images in ``[-1, 1]``, shape ``(N, D)``."""
    return torch.cat(
        [feature_net.features(images[lo : lo + batch_size].float()) for lo in range(0, images.shape[0], batch_size)]
    )


class Evaluator:
    """Holds the feature network and reference statistics; scores image sets.

    Args:
        feature_net: the classifier (default: the built-in ``fashion-features``).
        reference: reference statistics (default: the shipped training-set statistics).
    """

    def __init__(self, feature_net: nn.Module | None = None, reference: GaussianStats | None = None):
        self.feature_net = feature_net if feature_net is not None else load_builtin("fashion-features")
        self.reference = reference if reference is not None else load_train_stats()

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """FD against the reference (and class consistency when labels are given).

        Inside a ``torch.distributed`` process group, ``images`` are this rank's shard and the
        result covers the union of all shards (features are gathered, not images).
        """
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf; the model produced non-finite outputs.")
        feats = extract_features(self.feature_net, images)
        hits = None
        if labels is not None:
            with torch.no_grad():  # the classifier head on the features already computed
                head = getattr(self.feature_net, "head", None)
                logits = (
                    [head(f) for f in feats.split(500)] if head else [self.feature_net(x) for x in images.split(500)]
                )
                preds = torch.cat(logits).argmax(1)
            hits = int((preds == labels).sum())
        feats = cat_gathered(feats)
        out = {"fd": frechet_distance(feature_stats(feats), self.reference), "n": int(feats.shape[0])}
        if hits is not None:
            out["class_consistency"] = sum(gather(hits)) / max(1, feats.shape[0])
        return out


def evaluate(
    model: nn.Module,
    n: int = 1000,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_size: int = 250,
    evaluator: Evaluator | None = None,
    reference_model: nn.Module | None = None,
    reference_images: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Run the evaluation protocol on a denoiser.

    Args:
        model: denoiser ``model(x_t, t, class_labels) -> eps`` with ``config``, ``num_classes``,
            ``sample_shape`` (as the built-in models have).
        n: number of samples (balanced classes).
        steps, sampler, seed, guidance_scale, batch_size: see :func:`diffquant.sampling.sample`.
        evaluator: reuse an :class:`Evaluator` (feature net + statistics) across calls.
        reference_model: when given, also report ``psnr_vs_ref`` of the images against this
            model's images from identical noise (e.g. the full-precision model).
        reference_images: the reference model's images, if already sampled (same seed and n;
            in a process group, this rank's shard).
        progress: show progress bars.

    Returns:
        A dict with ``fd``, ``class_consistency``, ``n``, ``steps``, ``sampler``, ``seed``,
        ``guidance_scale``, ``seconds`` (sampling + scoring wall time) and ``psnr_vs_ref`` if asked.
    """
    from diffquant.sampling import sample

    evaluator = evaluator or Evaluator()
    start = time.perf_counter()
    rank, world = rank_and_world()
    lo, hi = shard(n, rank, world)  # the whole run outside a process group
    kw = dict(n=hi - lo, start=lo, steps=steps, sampler=sampler, seed=seed, guidance_scale=guidance_scale)
    images, labels = sample(model, batch_size=batch_size, progress=progress and rank == 0, **kw)
    result = evaluator.score(images, labels)
    result.update(steps=steps, sampler=sampler, seed=seed, guidance_scale=guidance_scale)
    if reference_model is not None and reference_images is None:
        reference_images, _ = sample(reference_model, batch_size=batch_size, progress=progress and rank == 0, **kw)
    if reference_images is not None:
        per_image = psnr_per_image(images, reference_images)
        result["psnr_vs_ref"] = float(cat_gathered(per_image).mean())
    result["seconds"] = round(max(gather(time.perf_counter() - start)), 2)
    if world > 1:
        result["world_size"] = world
    return result


@torch.no_grad()
def per_step_sqnr(
    reference: nn.Module,
    test: nn.Module,
    n: int = 64,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 250,
) -> list[dict]:
    """Noise-prediction SQNR of ``test`` against ``reference`` at every step of ``reference``'s trajectory.

    Both models see the same ``x_t`` (the reference model's trajectory), so the error at each step
    is the model's own, not accumulated drift. Returns one ``{"index", "t", "sqnr_db"}`` per step.
    """
    from diffquant.sampling import SamplerConfig, balanced_labels, sample_batch

    config = SamplerConfig(sampler=sampler, steps=steps, seed=seed)
    signal = torch.zeros(steps, dtype=torch.float64)
    noise = torch.zeros(steps, dtype=torch.float64)
    ts = [0] * steps

    def on_step(k, t, x_in, eps):
        labels = current_labels
        eps_test = test(x_in, torch.full((x_in.shape[0],), t, dtype=torch.long), labels)
        signal[k] += eps.double().pow(2).sum()
        noise[k] += (eps.double() - eps_test.double()).pow(2).sum()
        ts[k] = t

    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        current_labels = balanced_labels(hi - lo, reference.num_classes, lo)
        sample_batch(
            reference,
            range(lo, hi),
            current_labels,
            config,
            reference.config["scheduler"],
            reference.sample_shape,
            reference.num_classes,
            on_step=on_step,
        )
    out = []
    for k in range(steps):
        db = float("inf") if noise[k] == 0 else float(10 * torch.log10(signal[k] / noise[k]))
        out.append({"index": k, "t": ts[k], "sqnr_db": db})
    return out


__all__ = ["Evaluator", "evaluate", "extract_features", "load_reference", "load_train_stats", "per_step_sqnr", "sqnr"]
