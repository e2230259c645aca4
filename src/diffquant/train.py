"""Training of the built-in models, resumable from checkpoints.

``diffquant train unet|dit|features`` calls :func:`train`. Everything that defines a run (seed,
batch size, steps, learning rate, EMA) is in the model's JSON config; the checkpoint directory keeps
``checkpoint.pt`` (written atomically) and ``log.jsonl``. Running the same command again resumes.
Diffusion models train with the DDPM noise-prediction loss (Ho et al. 2020) and label dropout for
classifier-free guidance (Ho & Salimans 2022); the shipped weights are the EMA weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.data.fashion_mnist import load_fashion_mnist, to_model_range
from diffquant.models.builtin import build_model, load_config

KIND_TO_MODEL = {"unet": "fashion-unet", "dit": "fashion-dit", "features": "fashion-features"}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _augment(x: torch.Tensor, g: torch.Generator, hflip: bool, shift: int = 0) -> torch.Tensor:
    if hflip:
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        pad = F.pad(x, (shift,) * 4, value=-1.0)
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=g).tolist()
        x = pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    return x


def _lr_factor(step: int, warmup: int, total: int, cosine: bool, decay: int = 0) -> float:
    """Linear warm-up, then cosine to zero, or constant with a linear decay to zero over the last
    ``decay`` steps (warmup-stable-decay) when ``decay`` > 0, else constant."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return min(1.0, (total - step) / decay) if decay > 0 else 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _append_log(out_dir: Path, record: dict) -> None:
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    kind: str,
    out_dir: str | Path,
    steps: int | None = None,
    max_minutes: float | None = None,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    warm_start: str | Path | None = None,
    log=print,
) -> Path:
    """Train (or resume training) a built-in model.

    Args:
        kind: ``"unet"``, ``"dit"`` or ``"features"``.
        out_dir: checkpoint directory; an existing checkpoint there is resumed.
        steps: total optimizer steps (default: the config's).
        max_minutes: stop (after checkpointing) once this much wall time has passed.
        data_dir: Fashion-MNIST directory (default: see :mod:`diffquant.data`).
        threads: torch intra-op threads.
        warm_start: when ``out_dir`` has no checkpoint, start from these exported weights (e.g.
            the shipped ones) at the step recorded in them, with a fresh optimizer.
        log: a callable that receives one progress line.

    Returns:
        The checkpoint path.
    """
    if kind not in KIND_TO_MODEL:
        raise ValueError(f"kind must be one of {sorted(KIND_TO_MODEL)}, got {kind!r}")
    if threads:
        torch.set_num_threads(threads)
    config = load_config(KIND_TO_MODEL[kind])
    tc = config["train"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"

    images, labels = load_fashion_mnist("train", data_dir)
    x_all = to_model_range(images)
    n = x_all.shape[0]
    if kind == "features":
        total = steps or tc["epochs"] * (n // tc["batch_size"])
    else:
        total = steps or tc["steps"]

    torch.manual_seed(tc["seed"])
    model = build_model(config)
    ema = copy.deepcopy(model).requires_grad_(False) if "ema_decay" in tc else None
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    g = torch.Generator().manual_seed(tc["seed"])
    step = restart_step = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        step = ck["step"]
        restart_step = ck.get("restart_step", 0)
        log(f"resumed {ckpt_path} at step {step}")
    elif warm_start is not None:
        # Warm restart from exported (EMA) weights when the full checkpoint is gone: model and EMA
        # start from them, the optimizer starts fresh and the learning rate warms up again.
        from diffquant.models.builtin import load_weights_into

        load_weights_into(model, warm_start)
        if ema is not None:
            ema.load_state_dict(model.state_dict())
        step = restart_step = _exported_step(warm_start)
        g.manual_seed(tc["seed"] + step)
        torch.manual_seed(tc["seed"] + step)
        log(f"warm restart from {warm_start} at step {step}")

    def save():
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total, "config": config}
        state["restart_step"] = restart_step
        state.update(generator=g.get_state(), torch_rng=torch.get_rng_state())
        if ema is not None:
            state["ema"] = ema.state_dict()
        _atomic_save(state, ckpt_path)

    scheduler = None
    if kind != "features":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(**config["scheduler"])
        alphas_cumprod = scheduler.alphas_cumprod.float()

    model.train()
    start = time.monotonic()
    running, seen = 0.0, 0
    cosine = kind == "features"
    while step < total:
        for group in opt.param_groups:
            group["lr"] = tc["lr"] * _lr_factor(
                step - restart_step, tc.get("warmup_steps", 0), total - restart_step, cosine, tc.get("decay_steps", 0)
            )
        idx = torch.randint(0, n, (tc["batch_size"],), generator=g)
        x0 = _augment(x_all[idx], g, tc.get("hflip", False), tc.get("random_shift", 0))
        y = labels[idx]
        if kind == "features":
            loss = F.cross_entropy(model(x0), y, label_smoothing=0.1)
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            drop = torch.rand(y.shape, generator=g) < tc.get("class_dropout", 0.0)
            y = torch.where(drop, torch.full_like(y, config["num_classes"]), y)
            loss = F.mse_loss(model(x_t, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.get("grad_clip"):
            nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        step += 1
        if ema is not None:
            _ema_update(ema, model, min(tc["ema_decay"], (1 + step) / (10 + step)))
        running += loss.item()
        seen += 1
        elapsed = time.monotonic() - start
        out_of_time = max_minutes is not None and elapsed > 60 * max_minutes
        if step % tc["checkpoint_every"] == 0 or step == total or out_of_time:
            save()
            rec = {
                "step": step,
                "loss": running / seen,
                "lr": opt.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 1),
            }
            _append_log(out_dir, rec)
            log(f"step {step}/{total} loss {running / seen:.4f} ({elapsed / 60:.1f} min)")
            running, seen = 0.0, 0
        if out_of_time:
            break
    return ckpt_path


def export_weights(ckpt_path: str | Path, dest: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a checkpoint's EMA weights (or plain weights when it has no EMA) as safetensors.

    Buffers that are not floating point (e.g. BatchNorm's ``num_batches_tracked``) keep their dtype.
    """
    from safetensors.torch import save_file

    ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    state = ck.get("ema", ck["model"])
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(out, str(tmp), metadata={"step": str(ck["step"]), "model": ck["config"]["name"]})
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def _exported_step(path: str | Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("step", 0))


def checkpoint_progress(ckpt_path: str | Path, steps: int | None = None) -> tuple[int, int]:
    """``(steps done, total steps)`` of a checkpoint (total from ``steps`` or the config)."""
    ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    # checkpoints written before "total" was recorded fall back to the config's step count
    return ck["step"], steps or ck.get("total") or ck["config"]["train"].get("steps", ck["step"])


FLOOR_SIZES = (100, 500, 1000, 2000, 5000, 10000)


@torch.no_grad()
def compute_reference_stats(feature_net: nn.Module, data_dir: str | Path | None = None) -> tuple[dict, dict]:
    """Training-set feature statistics, and the FD "floor" of real test images at several N.

    The floor for N is the FD of the first N test images against the training-set statistics: what
    a perfect generator would score with N samples (FD is biased upwards for small N).

    Returns:
        ``(stats tensors for safetensors, {"fd_test_vs_train": {N: FD}, "test_accuracy": acc})``.
    """
    from diffquant.eval.evaluate import extract_features
    from diffquant.eval.fd import feature_stats, frechet_distance
    from diffquant.eval.metrics import class_consistency

    feature_net.eval()
    train_x, _ = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)
    train_stats = feature_stats(extract_features(feature_net, to_model_range(train_x)))
    test_x = to_model_range(test_x)
    test_feats = extract_features(feature_net, test_x)
    floors = {str(k): frechet_distance(feature_stats(test_feats[:k]), train_stats) for k in FLOOR_SIZES}
    acc = class_consistency(feature_net, test_x, test_y)
    return train_stats.to_tensors(), {"fd_test_vs_train": floors, "test_accuracy": acc, "train_n": train_stats.n}


def export_builtin(kind: str, ckpt_path: str | Path, data_dir: str | Path | None = None) -> list[Path]:
    """Write a finished checkpoint as the shipped weights of the built-in model (fp16 safetensors).

    For ``features`` this also writes the training-set feature statistics and ``reference.json``
    (test accuracy and the real-data FD floor), since FD depends on the feature network.
    """
    from safetensors.torch import save_file

    from diffquant.eval.evaluate import train_stats_path
    from diffquant.models.builtin import load_builtin, weights_path

    name = KIND_TO_MODEL[kind]
    dest = [export_weights(ckpt_path, weights_path(name))]
    if kind == "features":
        net = load_builtin(name)  # the exported fp16 weights, loaded the way evaluation loads them
        stats, reference = compute_reference_stats(net, data_dir)
        tmp = train_stats_path().with_name(train_stats_path().name + ".tmp")
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, train_stats_path())
        ref_path = weights_path(name).with_name("fashion-features-reference.json")
        ref_path.write_text(json.dumps(reference, indent=2) + "\n")
        dest += [train_stats_path(), ref_path]
    return dest


# ---- fashion-sd: a latent text-to-image pipeline, trained in two phases (VAE, then UNet + text encoder)


def _sd_data(data_dir, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from diffquant.models.fashion_sd import attributes, pad_images

    images, labels = load_fashion_mnist("train", data_dir)
    tone, texture = attributes(images, labels)
    return pad_images(to_model_range(images), pad), labels, tone, texture


def _train_vae(cfg: dict, out_dir: Path, x_all: torch.Tensor, max_minutes, log) -> tuple[nn.Module, bool]:
    """Phase 1: the autoencoder (reconstruction MSE + a small KL term, as latent diffusion's KL-f4 does
    without its perceptual and adversarial terms). Returns ``(vae, done)``."""
    from diffusers import AutoencoderKL

    tc, path = cfg["train_vae"], out_dir / "vae.pt"
    torch.manual_seed(tc["seed"])
    vae = AutoencoderKL(**cfg["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=tc["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(tc["seed"])
    step = 0
    if path.is_file():
        ck = torch.load(path, weights_only=False)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["generator"])
        step = ck["step"]
        if step >= tc["steps"]:
            return vae.eval(), True
        log(f"resumed {path} at step {step}")
    vae.train()
    start, running, seen = time.monotonic(), 0.0, 0
    while step < tc["steps"]:
        for group in opt.param_groups:
            group["lr"] = tc["lr"] * _lr_factor(step, tc["warmup_steps"], tc["steps"], cosine=True)
        idx = torch.randint(0, x_all.shape[0], (tc["batch_size"],), generator=g)
        x = _augment(x_all[idx], g, hflip=True)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x) + tc["kl_weight"] * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running, seen = running + loss.item(), seen + 1
        elapsed = time.monotonic() - start
        late = max_minutes is not None and elapsed > 60 * max_minutes
        if step % tc["checkpoint_every"] == 0 or step == tc["steps"] or late:
            _atomic_save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "generator": g.get_state()}, path
            )
            _append_log(out_dir, {"phase": "vae", "step": step, "loss": running / seen, "elapsed_s": round(elapsed, 1)})
            log(f"vae step {step}/{tc['steps']} loss {running / seen:.5f} ({elapsed / 60:.1f} min)")
            running, seen = 0.0, 0
        if late:
            return vae.eval(), False
    return vae.eval(), True


@torch.no_grad()
def _sd_latents(vae: nn.Module, x_all: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image and of its mirror image: ``(2, N, 4, h, w)`` each."""
    means, stds = [], []
    for images in (x_all, x_all.flip(-1)):
        m, s = [], []
        for i in range(0, images.shape[0], batch):
            posterior = vae.encode(images[i : i + batch]).latent_dist
            m.append(posterior.mean)
            s.append(posterior.std)
        means.append(torch.cat(m))
        stds.append(torch.cat(s))
    return torch.stack(means), torch.stack(stds)


def train_sd(
    out_dir: str | Path,
    steps: int | None = None,
    max_minutes: float | None = None,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    log=print,
    cfg: dict | None = None,
) -> tuple[int, int]:
    """Train (or resume) ``fashion-sd``: the VAE, then the UNet and the text encoder together on the
    VAE's latents (DDPM noise-prediction loss, the caption dropped to the empty prompt for guidance,
    EMA weights), checkpoints ``vae.pt`` and ``unet.pt`` in ``out_dir``.

    Args:
        out_dir: checkpoint directory; existing checkpoints there are resumed.
        steps: UNet phase steps (default: the config's).
        max_minutes: stop (after checkpointing) once this much wall time has passed.
        data_dir: Fashion-MNIST directory.
        threads: torch intra-op threads.
        log: a callable that receives one progress line.
        cfg: the pipeline's config (default: the shipped ``fashion-sd.json``); kept in ``unet.pt``.

    Returns:
        ``(steps done, total steps)`` over both phases.
    """
    from diffusers import DDPMScheduler

    from diffquant.models.fashion_sd import build_components, caption, config, tokenize

    if threads:
        torch.set_num_threads(threads)
    cfg = cfg or config()
    tv, tc = cfg["train_vae"], cfg["train"]
    total = steps or tc["steps"]
    start = time.monotonic()
    x_all, labels, tone, texture = _sd_data(data_dir, cfg["pad"])  # before any folder is made: bad input writes nothing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae, done = _train_vae(cfg, out_dir, x_all, max_minutes, log)
    if not done:
        return torch.load(out_dir / "vae.pt", weights_only=False)["step"], tv["steps"] + total
    remaining = None if max_minutes is None else max_minutes - (time.monotonic() - start) / 60

    torch.manual_seed(tc["seed"])
    parts = build_components(cfg, out_dir / "tokenizer")
    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    models = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = copy.deepcopy(models).requires_grad_(False)
    opt = torch.optim.AdamW(models.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    g = torch.Generator().manual_seed(tc["seed"])
    path, step = out_dir / "unet.pt", 0
    mean, std = _sd_latents(vae, x_all)
    if path.is_file():
        ck = torch.load(path, weights_only=False)
        models.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        g.set_state(ck["generator"])
        step, scaling = ck["step"], ck["scaling_factor"]
        log(f"resumed {path} at step {step}")
    else:  # latents scaled to unit variance, as Stable Diffusion's 0.18215 does for its VAE
        scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=g)).std())
    scheduler = DDPMScheduler(**{k: v for k, v in cfg["scheduler"].items() if k != "set_alpha_to_one"})
    alphas_cumprod = scheduler.alphas_cumprod.float()
    ids_of: dict[str, torch.Tensor] = {}

    def ids(texts: list[str]) -> torch.Tensor:
        missing = [t for t in set(texts) if t not in ids_of]
        if missing:
            ids_of.update(zip(missing, tokenize(tokenizer, missing), strict=True))
        return torch.stack([ids_of[t] for t in texts])

    def save() -> None:
        state = {"model": models.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}
        state.update(generator=g.get_state(), scaling_factor=scaling, total=total, config=cfg)
        _atomic_save(state, path)

    models.train()
    phase_start, running, seen = time.monotonic(), 0.0, 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = tc["lr"] * _lr_factor(step, tc["warmup_steps"], total, False, tc["decay_steps"])
        idx = torch.randint(0, x_all.shape[0], (tc["batch_size"],), generator=g)
        flip = (torch.rand(idx.shape, generator=g) < 0.5).long() if tc["hflip"] else torch.zeros_like(idx)
        z0 = (mean[flip, idx] + std[flip, idx] * torch.randn(mean.shape[2:], generator=g)) * scaling
        drop = torch.rand(idx.shape, generator=g) < tc["caption_dropout"]
        texts = [
            "" if d else caption(int(labels[i]), int(tone[i]), int(texture[i]), g)
            for i, d in zip(idx.tolist(), drop.tolist(), strict=True)
        ]
        t = torch.randint(0, scheduler.config.num_train_timesteps, idx.shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids(texts))[0]
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=hidden).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.get("grad_clip"):
            nn.utils.clip_grad_norm_(models.parameters(), tc["grad_clip"])
        opt.step()
        step += 1
        _ema_update(ema, models, min(tc["ema_decay"], (1 + step) / (10 + step)))
        running, seen = running + loss.item(), seen + 1
        elapsed = time.monotonic() - phase_start
        late = remaining is not None and elapsed > 60 * remaining
        if step % tc["checkpoint_every"] == 0 or step == total or late:
            save()
            _append_log(
                out_dir, {"phase": "unet", "step": step, "loss": running / seen, "elapsed_s": round(elapsed, 1)}
            )
            log(f"unet step {step}/{total} loss {running / seen:.4f} ({elapsed / 60:.1f} min)")
            running, seen = 0.0, 0
        if late:
            break
    return tv["steps"] + step, tv["steps"] + total


def export_sd(out_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Write the trained ``fashion-sd`` (EMA UNet and text encoder, the VAE with its latent scaling)
    as a ``StableDiffusionPipeline`` folder, fp16 safetensors (default: the shipped folder)."""
    from diffquant.models.fashion_sd import build_components, pipeline_dir, save_pipeline

    out_dir = Path(out_dir)
    ck = torch.load(out_dir / "unet.pt", weights_only=False)
    parts = build_components(ck["config"], out_dir / "tokenizer")
    parts["vae"].load_state_dict(torch.load(out_dir / "vae.pt", weights_only=False)["model"])
    nn.ModuleDict({"unet": parts["unet"], "text_encoder": parts["text_encoder"]}).load_state_dict(ck["ema"])
    parts["vae"].register_to_config(scaling_factor=ck["scaling_factor"])
    return save_pipeline(parts, dest if dest is not None else pipeline_dir())
