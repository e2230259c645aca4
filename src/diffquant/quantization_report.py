"""``QuantizationReport``: what ``quantize`` did, step by step, saved with the model.

A quantized model carries it as ``model.diffquant_report``; :func:`diffquant.save_quantized` writes
it to ``meta.json`` and :func:`diffquant.load_quantized` restores it. It is a ``dict`` of JSON values
keyed by method step (``"trajectory"`` first: what was recorded), so ``report["gptq"]["error_ratios"]``
reads one entry, and ``print(report)`` shows one line per step:

    >>> print(qmodel.diffquant_report)                       # doctest: +SKIP
    trajectory          10 calls, 2 samples, 10 steps, 1 run, 4.3 MB in memory
    ranges              2 calls replayed, 212 quantizers
    gptq                128 layers in 9 Hessian groups (14 replays); error vs RTN: median 0.61x, worst 0.97x
"""

from __future__ import annotations

import json
import statistics

__all__ = ["QuantizationReport"]


class QuantizationReport(dict):
    """Each method step's report, in the order the steps ran (a ``dict``, JSON-ready)."""

    @classmethod
    def from_dict(cls, data: dict | None) -> QuantizationReport:
        """A report from its saved form (``meta.json``); ``None`` gives an empty one."""
        if data is not None and not isinstance(data, dict):
            raise TypeError(f"a quantization report is a dict of step reports, got {type(data).__name__}")
        return cls(data or {})

    def to_dict(self) -> dict:
        """Plain JSON values (numbers from tensors or numpy become floats)."""
        return json.loads(json.dumps(dict(self), default=float))

    @property
    def steps(self) -> list[str]:
        """The method steps that ran, in order (without the recording)."""
        return [k for k in self if k != "trajectory"]

    def __str__(self) -> str:
        if not self:
            return "(no method step ran: a data-free recipe)"
        width = max(len(k) for k in self) + 2
        return "\n".join(f"{name:<{width}}{_describe(name, value)}" for name, value in self.items())

    def __repr__(self) -> str:
        return f"QuantizationReport({dict.__repr__(self)})"


def _describe(name: str, r) -> str:
    """One line for one step's report (its own keys; an unknown step prints its keys)."""
    if not isinstance(r, dict):
        return str(r)
    if name == "trajectory":
        line = f"{r.get('calls')} calls, {r.get('samples')} samples, {r.get('steps')} steps, {r.get('runs')} run(s)"
        line += f", {r.get('memory_bytes', 0) / 1e6:.1f} MB in memory"
        return line + (f", {r['spilled_bytes'] / 1e6:.1f} MB spilled to disk" if r.get("spilled_bytes") else "")
    if name == "gptq":
        ratios = list((r.get("error_ratios") or {}).values())
        line = f"{len(ratios)} layers in {r.get('groups')} Hessian group(s) ({r.get('replays')} replays)"
        if ratios:
            line += f"; output error vs RTN: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x"
        return line
    if name == "ranges":
        line = f"{r.get('calls')} calls replayed, {r.get('quantizers')} quantizers"
        fit = r.get("tdq_fit_rms") or {}
        return line + (f", TDQ fit on {len(fit)}" if fit else "")
    if name == "smoothquant":
        alphas = list((r.get("alphas") or {}).values())
        return f"{len(alphas)} layers, alpha " + (f"{min(alphas):.2f}..{max(alphas):.2f}" if alphas else "-")
    if name == "tdq_output_fit":
        verdict = "kept" if r.get("kept") else "not kept (no better than the calibrated ranges)"
        return (
            f"loss {r.get('loss_before', float('nan')):.4g} -> {r.get('loss_after', float('nan')):.4g}, "
            f"{r.get('steps_improved')}/{r.get('steps')} steps improved, {verdict}"
        )
    if name == "output_correction":
        ks = list((r.get("k") or {}).values())
        return f"per-step output gain on {len(ks)} steps" + (f", {min(ks):.3f}..{max(ks):.3f}" if ks else "")
    if name == "mixed_precision":
        return f"{len(r.get('upgraded') or [])} layers upgraded to the higher width"
    return ", ".join(f"{k}={v}" for k, v in r.items() if not isinstance(v, dict | list)) or ", ".join(r)
