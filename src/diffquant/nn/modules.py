"""Quantized ``Linear`` and ``Conv2d``: a weight format, an input quantizer, a float reference path.

Forward (the reference path every fast backend is tested against)::

    y = op(fake_quant_act(x), dequantize(w_q)) + b       # op = F.linear or F.conv2d

Before :meth:`QuantModule.freeze` the weight is a float ``Parameter`` fake-quantized on every call
(differentiable, for fine-tuning); after it, the weight is stored as integers (``qweight``, packed
two per byte for 4-bit and lower) with ``weight_scale``, and ``state_dict`` holds only those.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffquant import primitives as P
from diffquant.nn.quantizer import ActQuantizer
from diffquant.qtypes import QType, get_qtype

QMODULES: dict[type[nn.Module], type[QuantModule]] = {}


def register_qmodule(float_cls: type[nn.Module]):
    """Class decorator: register a quantized module as the replacement of ``float_cls``."""

    def wrap(cls):
        QMODULES[float_cls] = cls
        return cls

    return wrap


class QuantModule(nn.Module):
    """Shared weight handling of the quantized modules.

    Attributes:
        weight_qtype: the weight format, or ``None`` to keep float weights.
        group_size: weights per scale along the flattened input (``None`` = one per output channel).
        input_quantizer: :class:`ActQuantizer` or ``None`` (weight-only quantization).
        input_split: channels of the first part when the input is a concatenation whose two parts
            get separate scales (Q-Diffusion's shortcut split); ``input_quantizer_2`` takes the rest.
    """

    def _init_quant(self, weight_qtype, group_size, input_quantizer, input_split=0, input_quantizer_2=None):
        self.weight_qtype = get_qtype(weight_qtype) if weight_qtype is not None else None
        self.group_size = group_size
        self.input_quantizer = input_quantizer
        self.input_split = input_split
        self.input_quantizer_2 = input_quantizer_2
        self.weight_quant_enabled = True
        self._w_cache: torch.Tensor | None = None
        self.frozen = False
        self.smooth_stats = None  # a SmoothStats collector while SmoothQuant calibrates
        self.lora = None  # a QALoRA adapter while fine-tuning (diffquant.nn.lora), merged before freezing
        self.weight_scale_offset = None  # fine-tuning: log-multipliers of weight_scale_fixed, baked in after
        self.smooth_offset = None  # fine-tuning: log-multipliers of the smoothing factors, baked in after
        if "smooth" not in self._buffers:
            self.register_buffer("smooth", None)  # SmoothQuant factors once enabled (None: not saved)
        if "weight_scale_fixed" not in self._buffers:
            # weight scales chosen by a method (clipping search, GPTQ) instead of the absmax; None: absmax
            self.register_buffer("weight_scale_fixed", None)

    def enable_smoothing(self) -> None:
        """Give the layer a SmoothQuant factor per input channel (``x / s``, ``W * s``), initially 1."""
        if self.smooth is None:
            self.smooth = torch.ones(self.weight.shape[1], device=self.weight.device)

    def _device(self) -> torch.device:
        return next((t.device for t in (*self.parameters(), *self.buffers())), torch.device("cpu"))

    def smooth_factors(self) -> torch.Tensor | None:
        """The smoothing factors the forward divides the input by: ``smooth``, times the learned
        multipliers while fine-tuning trains them (``FinetuneConfig.train`` with ``"smooth"``)."""
        if self.smooth_offset is None:
            return self.smooth
        return self.smooth * self.smooth_offset.exp()

    def smooth_like(self, t: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
        """:meth:`smooth_factors` shaped to scale ``t`` along its input channels ``channel_dim`` (1 for
        a weight, 1 or -1 for an input), ``None`` without smoothing."""
        smooth = self.smooth_factors()
        if smooth is None:
            return None
        shape = [1] * t.dim()
        shape[channel_dim] = -1
        return smooth.to(t.dtype).view(shape)

    def quantize_input(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self.smooth_stats is not None and self.input_quantizer is not None and self.input_quantizer.observing:
            self.smooth_stats.update(x)
        smooth = self.smooth_like(x, channel_dim)
        if smooth is not None:
            x = x / smooth
        if self.input_quantizer is None:
            return x
        if self.input_split:
            a, b = x.split([self.input_split, x.shape[channel_dim] - self.input_split], dim=channel_dim)
            return torch.cat([self.input_quantizer(a), self.input_quantizer_2(b)], dim=channel_dim)
        return self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses: dequantized integers (frozen) or fake-quantized float."""
        if self.frozen:
            if self._w_cache is None:
                self._w_cache = self._stored().dequantize()
            return self._w_cache
        w = self.effective_weight()
        if self.weight_qtype is None or not self.weight_quant_enabled:
            return w
        scale = self.weight_scale_fixed
        if self.weight_scale_offset is not None:  # fine-tuning: learned log-multipliers of the scales
            scale = scale * self.weight_scale_offset.exp()
        return P.fake_quant_weight(w, self.weight_qtype, self.group_size, scale=scale)

    def effective_weight(self) -> torch.Tensor:
        """The float weight that is quantized: ``weight`` (plus a LoRA update while fine-tuning), times
        the SmoothQuant factors if any."""
        w = self.weight if self.lora is None else self.weight + self.lora.delta(self.weight.shape)
        smooth = self.smooth_like(w, 1)
        return w if smooth is None else w * smooth

    def _pack_bits(self) -> int:
        """Bits per code of the packed ``qweight``: the format's own packing, or the one its length
        says (ternary and int2 weights saved before 2-bit packing existed are two codes per byte)."""
        padded = self.weight_scale.shape[1] * int(self.weight_group.item())
        natural = P.packing_bits(self.weight_qtype)
        for bits in (natural, 4, 2, 1):
            if self.qweight.shape[-1] == -(-padded * bits // 8):
                return bits
        raise ValueError(f"qweight of {self.qweight.shape[-1]} bytes per row fits no packing of {padded} codes")

    def _stored(self) -> P.QuantizedWeight:
        packed = self.qweight.dtype == torch.uint8
        return P.QuantizedWeight(
            self.qweight, self.weight_scale, torch.Size(self.weight_shape.tolist()), self.weight_qtype,
            int(self.weight_group.item()), packed, self._pack_bits() if packed else 8,
        )  # fmt: skip

    def integer_weight(self) -> torch.Tensor:
        """The stored integer codes as int8 in the float weight's shape (unpacked; frozen layers)."""
        shape = self.weight_shape.tolist()
        packed = self.qweight.dtype == torch.uint8
        q = P.unpack_bits(self.qweight, self._pack_bits()) if packed else self.qweight.reshape(shape[0], -1)
        return q[:, : math.prod(shape[1:])].to(torch.int8).reshape(shape).contiguous()

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the float weight by its integer storage (``qweight``, ``weight_scale``)."""
        if self.frozen or self.weight_qtype is None:
            return
        qw = P.quantize_weight(self.effective_weight(), self.weight_qtype, self.group_size, self.weight_scale_fixed)
        del self.weight
        self.weight_scale_fixed = None
        self.register_buffer("qweight", qw.qdata)
        self.register_buffer("weight_scale", qw.scale)
        self.register_buffer("weight_shape", torch.tensor(list(qw.shape)))
        self.register_buffer("weight_group", torch.tensor(qw.group_size))
        self.frozen = True
        self._w_cache = None

    @torch.no_grad()
    def thaw(self) -> None:
        """Undo :meth:`freeze`: the float weight again, holding the dequantized integers (with the
        SmoothQuant factors divided out), and the stored scales kept as ``weight_scale_fixed``, so
        fake-quant reproduces the integers exactly. Fine-tuning starts here from a quantized model."""
        if not self.frozen:
            return
        w = self._stored().dequantize().reshape(torch.Size(self.weight_shape.tolist())).float()
        scale = self.weight_scale.float().clone()
        if self.smooth is not None:
            w = w / self.smooth_like(w, 1)
        for key in ("qweight", "weight_scale", "weight_shape", "weight_group"):
            delattr(self, key)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.weight_scale_fixed = scale
        self.frozen = False
        self._w_cache = None

    def adopt_frozen(self, state_dict: dict, prefix: str = "", device: str = "cpu") -> None:
        """Become frozen with the integer storage of a saved state (shapes and dtypes from ``state_dict``,
        values filled by loading it): no float weight, no quantization pass.

        Args:
            device: of the empty buffers; ``meta`` when the state will be assigned, not copied, into them.
        """
        if self.frozen:
            return
        if "weight" in self._parameters:
            del self.weight
        self.weight_scale_fixed = None
        for key in ("qweight", "weight_scale", "weight_shape", "weight_group"):
            self.register_buffer(key, torch.empty_like(state_dict[prefix + key], device=device))
        self.frozen = True
        self._w_cache = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "qweight" in state_dict and not self.frozen:
            self.adopt_frozen(state_dict, prefix)  # make the integer buffers exist before loading
        if prefix + "smooth" in state_dict and self.smooth is None:  # factors learned by fine-tuning
            self.smooth = torch.empty_like(state_dict[prefix + "smooth"], device=self._device())
        for key in ("qweight", "weight_scale"):  # take the stored dtype (e.g. float32 scales out of fp16 range)
            saved = state_dict.get(prefix + key)
            if self.frozen and saved is not None and getattr(self, key).dtype != saved.dtype:
                setattr(self, key, torch.empty_like(saved, device=getattr(self, key).device))
        self._w_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_bytes(self) -> int:
        """Bytes of weight storage (integers + scales when frozen, float otherwise)."""
        if self.frozen:
            return (
                self.qweight.numel() * self.qweight.element_size()
                + self.weight_scale.numel() * self.weight_scale.element_size()
            )
        return self.weight.numel() * self.weight.element_size()


@register_qmodule(nn.Linear)
class QuantLinear(QuantModule):
    """Quantized ``nn.Linear`` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._init_quant(None, None, None)

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_qtype: QType | str | None, group_size=None, input_quantizer=None, **kw
    ) -> QuantLinear:
        q = cls(module.in_features, module.out_features, module.bias is not None)
        q.weight, q.bias = module.weight, module.bias  # the float module's own parameters: no copy
        q._init_quant(weight_qtype, group_size, input_quantizer, **kw)
        return q if module.weight.is_meta else q.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x, -1), self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        g = f", group={self.group_size}" if self.group_size else ""
        return f"{self.in_features}, {self.out_features}, weight={self.weight_qtype}{g}"


@register_qmodule(nn.Conv2d)
class QuantConv2d(QuantModule):
    """Quantized ``nn.Conv2d`` (see the module docstring); input per-token scales are per pixel."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported; only 'zeros'")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight, self.bias = conv.weight, conv.bias  # the float module's own parameters: no copy
        self._init_quant(None, None, None)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_qtype: QType | str | None, group_size=None, input_quantizer=None, **kw
    ) -> QuantConv2d:
        q = cls(module)
        q._init_quant(weight_qtype, group_size, input_quantizer, **kw)
        return q if module.weight.is_meta else q.to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        return F.conv2d(self.quantize_input(x, 1), w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        g = f", group={self.group_size}" if self.group_size else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"weight={self.weight_qtype}{g}"
        )


@register_qmodule(nn.Embedding)
class QuantEmbedding(QuantModule):
    """Quantized ``nn.Embedding``: weight-only (the input is an index), one scale per row."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("embeddings with max_norm or sparse gradients are not supported")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight, self.bias = emb.weight, None  # the float module's own parameter: no copy
        self._init_quant(None, None, None)

    @classmethod
    def from_float(
        cls, module: nn.Embedding, weight_qtype: QType | str | None, group_size=None, input_quantizer=None, **kw
    ) -> QuantEmbedding:
        if input_quantizer is not None:
            raise ValueError("an embedding's input is an index: quantize its weights only (activations 'none')")
        q = cls(module)
        q._init_quant(weight_qtype, group_size, None)
        return q if module.weight.is_meta else q.to(module.weight.device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.quantized_weight(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_qtype}"


def make_input_quantizer(module: nn.Module, name: str, **kwargs) -> ActQuantizer:
    """An :class:`ActQuantizer` with the channel dim that fits ``module`` (1 for Conv2d, -1 for Linear)."""
    channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
    return ActQuantizer(channel_dim=channel_dim, name=name, **kwargs)
