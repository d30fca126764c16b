"""lightning_bridge.attention: the fused core attention equals megatron-core's unfused one and transformers.

Tolerances (fp32, CPU; measured figures in brackets): core attention against a float64 reference
1e-5 [<= 1e-6]; every family's logits against transformers' eager attention 1e-5 relative to the
largest logit [<= 7e-7], against the unfused core attention 1e-5 [<= 7e-7]; parameter gradients
against the unfused core attention 1e-4 relative to each gradient's largest entry.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import FAMILIES, make_checkpoint
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

from lightning_bridge import AutoBridge
from lightning_bridge.attention import (
    FusedDotProductAttention,
    SoftcappedDotProductAttention,
    core_attention_spec,
)
from lightning_bridge.distributed import initialize_model_parallel
from lightning_bridge.verify import relative_difference

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM = 12, 2, 4, 2, 16
WINDOWED = ["mistral", "phi3", "gemma2", "gemma3"]  # sliding windows; gemma2 also soft-caps


def attention_config(**overrides) -> TransformerConfig:
    initialize_model_parallel()
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=HEADS, num_query_groups=GROUPS,
                  kv_channels=HEAD_DIM, masked_softmax_fusion=False, attention_dropout=0.0,
                  use_cpu_initialization=True)
    return TransformerConfig(**{**fields, **overrides})


def reference_attention(q, k, v, scale, keep, cap=None) -> torch.Tensor:
    """float64 softmax attention on [seq, batch, heads, dim]; ``keep`` [batch, 1, sq, sk], True = attend."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    probs = scores.masked_fill(~keep, -1e30).softmax(-1)  # finite: rows that see nothing stay finite
    out = probs @ v
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def qkv(requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    return [(2 * torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=generator)).requires_grad_(requires_grad)
            for heads in (HEADS, GROUPS, GROUPS)]


def padding_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's [batch, 1, s, s] mask (True = masked out, causal included) for a left-padded and a
    right-padded sequence, and the 2D [batch, s] mask of real tokens."""
    real = torch.ones(BATCH, SEQ, dtype=torch.bool)
    real[0, :3] = False  # left padding
    real[1, -4:] = False  # right padding
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return ~(causal & real[:, None, None, :]), real


# --- the core attention on its own ------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
def test_core_attention_is_softmax_attention(kernel, window, cap, masked):
    """Causal GQA attention with the config's scale, window, soft-cap and a padding mask, and its
    gradients, against a float64 reference (rows of padded queries excluded)."""
    config = attention_config(softmax_scale=0.3, window_size=(window - 1, 0) if window else None)
    attention = FusedDotProductAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.3, softcap=cap,
                                         kernel=kernel)
    flex = kernel == "flex"
    q, k, v = qkv(requires_grad=not flex or torch.cuda.is_available())  # flex has no CPU backward
    mask, real = padding_mask() if masked else (None, torch.ones(BATCH, SEQ, dtype=torch.bool))
    pos = torch.arange(SEQ)
    keep = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < window) if window else True)
    keep = keep & (~mask if masked else True)
    ours = attention(q, k, v, mask)
    expected = reference_attention(q, k, v, 0.3, keep.expand(BATCH, 1, SEQ, SEQ), cap)
    rows = real.T[..., None] & keep.expand(BATCH, 1, SEQ, SEQ).any(-1)[:, 0].T[..., None]  # [s, b, 1]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours * rows, torch.where(rows, expected, 0).float(), rtol=1e-5, atol=1e-5)
    if not q.requires_grad:
        return
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)) * rows
    ours_grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad(torch.where(rows, expected * weights.double(), 0).sum(), (q, k, v))
    for ours_grad, expected_grad in zip(ours_grads, expected_grads):
        assert torch.isfinite(ours_grad).all()
        torch.testing.assert_close(ours_grad, expected_grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_core_attention_equals_megatron_unfused_attention(window):
    """Same constructor and forward as DotProductAttention, same output; query-key layer scaling
    (Megatron divides the scale, then multiplies it back) gives the same scale."""
    for scaling in (False, True):
        config = attention_config(window_size=(window - 1, 0) if window else None,
                                  apply_query_key_layer_scaling=scaling)
        args = (config, 2, AttnMaskType.causal, "self")
        q, k, v = qkv()
        torch.testing.assert_close(FusedDotProductAttention(*args)(q, k, v, None),
                                   DotProductAttention(*args)(q, k, v, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_attention_dropout_applies_in_training_only(cap):
    config = attention_config(attention_dropout=0.5)
    attention = FusedDotProductAttention(config, 1, AttnMaskType.causal, "self", softcap=cap)
    q, k, v = qkv()
    evaluated = attention.eval()(q, k, v, None)
    torch.testing.assert_close(evaluated, FusedDotProductAttention(attention_config(), 1, AttnMaskType.causal,
                                                                   "self", softcap=cap)(q, k, v, None))
    assert not torch.allclose(attention.train()(q, k, v, None), evaluated, atol=1e-3)


# --- which core attention a layer gets --------------------------------------------------------------------
@pytest.mark.parametrize("backend,softcap,expected", [
    ("auto", None, FusedDotProductAttention), ("sdpa", None, FusedDotProductAttention),
    ("flex", 2.0, FusedDotProductAttention), ("local", None, DotProductAttention),
    ("local", 2.0, SoftcappedDotProductAttention), ("unfused", None, DotProductAttention),
    (AttnBackend.local, None, DotProductAttention), (AttnBackend.flash, None, FusedDotProductAttention),
])
def test_core_attention_spec_follows_attention_backend(backend, softcap, expected):
    spec = core_attention_spec(attention_config(attention_backend=backend), softcap=softcap)
    assert spec.module is expected
    if expected is FusedDotProductAttention:
        assert spec.params["softcap"] == softcap


def test_unknown_attention_backend_is_named(tmp_path):
    provider = AutoBridge.from_hf_pretrained(make_checkpoint("llama", tmp_path)).to_megatron_provider()
    provider.attention_backend = "flash3"
    with pytest.raises(ValueError, match=r"attention_backend='flash3' is not known. Choose one of "
                                         r"\['auto', 'flex', 'local', 'sdpa'\]"):
        provider.finalize()


@pytest.mark.parametrize("attn_implementation,backend,module", [
    (None, "auto", FusedDotProductAttention), ("eager", "local", DotProductAttention),
    ("sdpa", "sdpa", FusedDotProductAttention), ("flash_attention_2", "auto", FusedDotProductAttention),
])
def test_attn_implementation_chooses_the_core_attention(tmp_path, attn_implementation, backend, module):
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    bridge = AutoBridge.from_hf_pretrained(make_checkpoint("llama", tmp_path), **kwargs)
    provider = bridge.to_megatron_provider()
    assert provider.attention_backend == backend
    model = provider()[0]
    assert type(model.decoder.layers[0].self_attention.core_attention) is module


# --- every family: logits and gradients -------------------------------------------------------------------
def build(folder, backend: str):
    provider = AutoBridge.from_hf_pretrained(folder).to_megatron_provider(show_progress=False)
    provider.attention_backend = backend
    return provider()[0].eval()  # no dropout: both paths compute the same function


def logits_and_grads(model, input_ids, mask=None, backward=True):
    """Logits [b, s, vocab] and the gradients of a fixed random function of them, by parameter name."""
    model.zero_grad()
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.set_grad_enabled(backward):
        logits = model(input_ids, position_ids, mask)[..., :96]
    if not backward:
        return logits, {}
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours: dict, reference: dict, tolerance: float):
    assert ours.keys() == reference.keys()
    for name in reference:
        assert relative_difference(ours[name], reference[name]) <= tolerance, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_logits_and_gradients_match_unfused_and_transformers(family, tmp_path):
    folder = make_checkpoint(family, tmp_path / family)
    input_ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids).logits
    unfused_logits, unfused_grads = logits_and_grads(build(folder, "local"), input_ids)
    backends = ["auto", "flex"] if family in WINDOWED else ["auto"]
    for backend in backends:
        backward = backend != "flex" or torch.cuda.is_available()  # flex attention has no CPU backward
        logits, grads = logits_and_grads(build(folder, backend), input_ids, backward=backward)
        assert relative_difference(logits, expected) <= 1e-5, backend
        assert relative_difference(logits, unfused_logits) <= 1e-5, backend
        if backward:
            assert_same_grads(grads, unfused_grads, 1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "deepseek-v3"])
def test_padded_mask_matches_transformers(family, tmp_path):
    """A left- and a right-padded sequence: the [b, 1, s, s] mask with the layer's causality, window
    and soft-cap give transformers' logits at every real token (the unfused attention drops the
    mask in window layers, so transformers is the reference)."""
    folder = make_checkpoint(family, tmp_path / family)
    mask, real = padding_mask()
    input_ids = torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=real.long(),
                             position_ids=torch.arange(SEQ).expand(BATCH, SEQ)).logits
    for backend in ["auto", "flex"]:
        backward = backend != "flex" or torch.cuda.is_available()
        logits, grads = logits_and_grads(build(folder, backend), input_ids, mask, backward=backward)
        assert relative_difference(logits[real], expected[real]) <= 1e-5, backend
        assert all(torch.isfinite(g).all() for g in grads.values())
