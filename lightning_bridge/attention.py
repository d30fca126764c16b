"""The core attention of every family's layer: torch's fused kernels, or megatron-core's unfused one.

megatron-core 0.16's local spec takes its core attention from ``LocalSpecProvider.core_attention()``:
``DotProductAttention``, which materialises the [batch x heads, seq, seq] scores (``baddbmm``, a
masked fp32 softmax and their copies). On one H200 that was about 55% of a Llama-3.2-1B training
step and most of its peak memory. :class:`FusedDotProductAttention` is a drop-in replacement (same
constructor, same forward: q, k, v as [seq, batch, heads, head_dim] with this rank's heads,
output [seq, batch, heads x head_dim]) that calls torch's fused kernels:

- ``scaled_dot_product_attention(is_causal=True)`` for plain causal attention (cuDNN / flash
  kernels on CUDA), GQA and MQA included; a boolean mask when a sliding window or an
  ``attention_mask`` must be honoured and flex attention is not used;
- ``torch.nn.attention.flex_attention`` (compiled on CUDA) for what SDPA cannot express: attention
  logit soft-capping (Gemma 2), and, on CUDA, sliding windows (Mistral, Phi-3, Gemma 2/3 sliding
  layers) as block-sparse masks.

Everything comes from config fields, exactly as ``DotProductAttention`` reads them: the softmax
scale (``softmax_scale``, by default ``head_dim ** -0.5``; Gemma's ``query_pre_attn_scalar``
arrives through it), the layer's window (``window_size``, ``window_attn_skip_freq``) and
``attention_dropout`` (in training). The soft-capping value is a spec parameter. An
``attention_mask`` follows Megatron's convention: bool, broadcastable to [batch, 1, seq, seq],
True = masked out. It is combined with causality and the layer's window (where megatron-core's
unfused softmax drops a given mask in window layers). Query rows that would see no key at all
(padding) attend to every key instead, so they stay finite; their outputs are not meaningful.

Which core attention a layer gets is chosen in one place, :func:`core_attention_spec`, from the
provider's ``attention_backend`` (see :data:`BACKENDS`).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import is_layer_window_attention

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

logger = logging.getLogger(__name__)

# attention_backend values (Megatron's AttnBackend members are accepted too, see _normalise):
BACKENDS = {
    "auto": "torch's fused kernels: SDPA; on CUDA flex attention for windows and soft-capping (soft-capped "
            "layers on the CPU or with dropout: the scores materialised, flex has no CPU backward nor dropout)",
    "sdpa": "scaled_dot_product_attention, windows as boolean masks; soft-capping through flex attention",
    "flex": "flex_attention for every layer (compiled on CUDA; on the CPU forward only)",
    "local": "megatron-core's unfused DotProductAttention (the [b*h, s, s] scores materialised)",
}
_ALIASES = {"unfused": "local", "eager": "local", "flash": "sdpa", "fused": "sdpa",
            "flash_attention_2": "sdpa"}


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``tanh(x / cap) * cap`` in ``x``'s dtype, the operations in transformers' order."""
    return torch.tanh(x / cap) * cap


class _HeadSizes:
    """Multi-latent attention (``MLASelfAttention``) builds its core attention with the key and value
    head sizes (``k_channels``, ``v_channels``: 192 and 128 in DeepSeek-V3), which megatron-core 0.16's
    ``DotProductAttention`` does not take: it sizes its output by ``kv_channels``. Here the output is
    this rank's heads x ``v_channels``; the softmax scale is MLA's own (``softmax_scale``)."""

    def _use_head_sizes(self, v_channels: int | None) -> None:
        if v_channels is not None:
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels


class LatentDotProductAttention(_HeadSizes, DotProductAttention):
    """megatron-core's unfused ``DotProductAttention`` for multi-latent attention (:class:`_HeadSizes`)."""

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._use_head_sizes(v_channels)


class FusedDotProductAttention(_HeadSizes, DotProductAttention):
    """``DotProductAttention`` computed by torch's fused attention kernels (SDPA, flex attention).

    ``softcap``: cap the scaled scores at ``tanh(s / cap) * cap`` before masking and softmax.
    ``kernel``: "auto" (SDPA; on CUDA flex attention for soft-capping and windows), "sdpa" (SDPA;
    flex only for soft-capping) or "flex" (flex attention throughout). Soft-capped layers on the
    CPU, or with dropout in training, compute their scores explicitly (flex attention has no CPU
    backward and no dropout).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, *, softcap: float | None = None,
                 kernel: str = "auto", k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale, **kwargs)
        self._use_head_sizes(v_channels)
        if self.config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={self.config.softmax_type!r} is not supported by the fused core "
                             "attention; set attention_backend='local'.")
        if config.apply_query_key_layer_scaling:  # Megatron divides the scale here, multiplies it back later
            self.softmax_scale *= self.layer_number
        self.softcap = softcap
        self.kernel = kernel
        self.window = (tuple(config.window_size) if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention_bias are not supported by the core attention.")
        causal = (attn_mask_type or self.attn_mask_type) in (AttnMaskType.causal, AttnMaskType.padding_causal)
        dropout = self.attention_dropout.p if self.training else 0.0
        # [s, b, h, d] -> [b, h, s, d]: a view, the head dimension stays contiguous
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        kernel = self._kernel(q, attention_mask, dropout)
        if kernel == "flex":
            context = self._flex(q, k, v, attention_mask, causal)
        elif kernel == "math":
            context = self._math(q, k, v, attention_mask, causal, dropout)
        elif attention_mask is None and self.window is None and causal:
            context = self._sdpa(q, k, v, None, dropout, is_causal=True)
        else:
            keep = _keep_mask(attention_mask, q.shape[2], k.shape[2], causal, self.window, q.device)
            context = self._sdpa(q, k, v, keep, dropout, is_causal=False)
        # [b, h, s, d] -> [s, b, h * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)

    # -----------------------------------------------------------------------------------------
    def _kernel(self, q: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float) -> str:
        if self.kernel == "flex":
            return "flex"
        if self.softcap is not None:  # SDPA cannot cap; flex has no dropout and no CPU backward
            return "flex" if q.is_cuda and dropout == 0.0 else "math"
        # on CUDA a window alone is a block-sparse flex mask; with dropout or a mask, SDPA's bool mask
        if self.kernel == "auto" and q.is_cuda and self.window is not None and attention_mask is None \
                and dropout == 0.0:
            return "flex"
        return "sdpa"

    def _math(self, q, k, v, attention_mask, causal: bool, dropout: float) -> torch.Tensor:
        """Scores materialised, as transformers' eager attention: the soft-capped layers on the CPU."""
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        if self.softcap is not None:
            scores = softcap(scores, self.softcap)
        keep = _keep_mask(attention_mask, q.shape[2], k.shape[2], causal, self.window, q.device)
        probs = scores.float().masked_fill(~keep, float("-inf")).softmax(-1).to(q.dtype)
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = F.dropout(probs, dropout)
        elif dropout > 0:
            probs = F.dropout(probs, dropout)
        return torch.matmul(probs, v)

    def _sdpa(self, q, k, v, keep, dropout: float, is_causal: bool) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        # flash / cuDNN take grouped k, v; the memory-efficient and math kernels need them expanded
        native_gqa = q.is_cuda and keep is None and q.dtype in (torch.float16, torch.bfloat16)
        if groups > 1 and not native_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        kwargs = dict(attn_mask=keep, dropout_p=dropout, is_causal=is_causal, scale=self.softmax_scale,
                      enable_gqa=groups > 1 and native_gqa)
        if dropout > 0 and not self.config.sequence_parallel:  # as DotProductAttention draws its dropout
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _flex(self, q, k, v, attention_mask, causal: bool) -> torch.Tensor:
        if self.training and self.attention_dropout.p > 0:
            raise ValueError("flex attention has no dropout: use attention_backend='sdpa' or 'local' "
                             f"with attention_dropout={self.attention_dropout.p}.")
        block_mask = _block_mask(attention_mask, q.shape[0], q.shape[2], k.shape[2], causal, self.window,
                                 q.device)
        score_mod = _softcap_score_mod(self.softcap) if self.softcap is not None else None
        return _flex_attention(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                              scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])


class SoftcappedDotProductAttention(DotProductAttention):
    """megatron-core's unfused attention with the scaled scores soft-capped before the softmax."""

    def __init__(self, *args, softcap: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_mask_softmax = _SoftcapBeforeSoftmax(self.scale_mask_softmax, softcap)


class _SoftcapBeforeSoftmax(torch.nn.Module):
    """Wraps Megatron's mask-and-softmax module: soft-caps the scores, then masks and softmaxes."""

    def __init__(self, scale_mask_softmax: torch.nn.Module, cap: float):
        super().__init__()
        self.scale_mask_softmax = scale_mask_softmax
        self.cap = cap

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None, softmax_offset=None) -> torch.Tensor:
        return self.scale_mask_softmax(softcap(scores, self.cap), mask, softmax_offset)


# ---------------------------------------------------------------------------------------------
def resolve_backend(config: TransformerConfig, softcap: float | None = None) -> str:
    """The concrete backend ("sdpa", "flex" or "local") for ``config.attention_backend``."""
    backend = _normalise(getattr(config, "attention_backend", "auto"))
    if backend != "auto":
        return backend
    if config.softmax_type != "vanilla":
        return "local"
    return "sdpa" if softcap is None else "flex"


def core_attention_spec(config: TransformerConfig, softcap: float | None = None) -> ModuleSpec:
    """The layer spec's ``core_attention`` for ``config.attention_backend`` (and a soft-cap, if any)."""
    backend = resolve_backend(config, softcap)
    if backend == "local":
        if softcap is None:
            latent = getattr(config, "multi_latent_attention", False)
            return ModuleSpec(module=LatentDotProductAttention if latent else DotProductAttention)
        return ModuleSpec(module=SoftcappedDotProductAttention, params={"softcap": softcap})
    kernel = "auto" if _normalise(getattr(config, "attention_backend", "auto")) == "auto" else backend
    return ModuleSpec(module=FusedDotProductAttention, params={"softcap": softcap, "kernel": kernel})


def _normalise(backend) -> str:
    if isinstance(backend, AttnBackend):
        backend = backend.name
    name = _ALIASES.get(str(backend).lower(), str(backend).lower())
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is not known. Choose one of {sorted(BACKENDS)} "
                         f"(or {sorted(_ALIASES)}, their aliases).")
    return name


def _keep_mask(attention_mask: torch.Tensor | None, sq: int, sk: int, causal: bool,
               window: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """SDPA's boolean mask, True = attend: not ``attention_mask``, within causality and the window."""
    keep = _positions_mask(sq, sk, causal, window, device)
    if attention_mask is not None:
        keep = keep & ~attention_mask.to(device=device, dtype=torch.bool)
        keep = keep | ~keep.any(dim=-1, keepdim=True)  # rows that see nothing see everything: no NaN
    return keep


def _positions_mask(sq: int, sk: int, causal: bool, window: tuple[int, int] | None,
                    device: torch.device) -> torch.Tensor:
    q = torch.arange(sq, device=device)[:, None] + (sk - sq)  # queries are the last sq positions
    k = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (k <= q)
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            keep = keep & (q - k <= left)
        if right is not None and right >= 0:
            keep = keep & (k - q <= right)
    return keep


# --- flex attention ----------------------------------------------------------------------------
@functools.cache
def _flex_attention(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # compiled, flex attention is one fused kernel; eager (the CPU) it is a reference computation
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


@functools.cache
def _softcap_score_mod(cap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


def _positions_mask_mod(causal: bool, window: tuple[int, int] | None, offset: int):
    left, right = window if window is not None else (None, None)

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + offset
        keep = kv_idx <= q if causal else kv_idx >= 0
        if left is not None and left >= 0:
            keep = keep & (q - kv_idx <= left)
        if right is not None and right >= 0:
            keep = keep & (kv_idx - q <= right)
        return keep

    return mask_mod


_LAST_MASK: list = [None, None, None]  # (weakref to the attention_mask, its key, its block mask)


def _block_mask(attention_mask: torch.Tensor | None, batch: int, sq: int, sk: int, causal: bool,
                window: tuple[int, int] | None, device: torch.device):
    """The flex block mask: cached per shape and window; per ``attention_mask`` tensor when given
    (every layer of a forward receives the same tensor)."""
    if attention_mask is None:
        return _positions_block_mask(sq, sk, causal, window, str(device))
    key = (batch, sq, sk, causal, window, str(device))
    cached, cached_key, block_mask = _LAST_MASK
    if cached is not None and cached() is attention_mask and cached_key == key:
        return block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    keep = _keep_mask(attention_mask, sq, sk, causal, window, device).expand(batch, 1, sq, sk).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, 0, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, batch, None, sq, sk, device=device)
    _LAST_MASK[:] = [weakref.ref(attention_mask), key, block_mask]
    return block_mask


@functools.lru_cache(maxsize=32)
def _positions_block_mask(sq: int, sk: int, causal: bool, window: tuple[int, int] | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_positions_mask_mod(causal, window, sk - sq), None, None, sq, sk, device=device)
