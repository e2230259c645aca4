"""Evaluation: FD, class consistency, fidelity between two models (PSNR, per-step SQNR)."""

from diffquant.eval.evaluate import Evaluator, evaluate, extract_features, load_train_stats, per_step_sqnr
from diffquant.eval.fd import GaussianStats, feature_stats, frechet_distance, paired_fd_gap_interval
from diffquant.eval.metrics import class_consistency, psnr, psnr_per_image, sqnr

__all__ = [
    "Evaluator",
    "GaussianStats",
    "class_consistency",
    "evaluate",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "load_train_stats",
    "paired_fd_gap_interval",
    "per_step_sqnr",
    "psnr",
    "psnr_per_image",
    "sqnr",
]
