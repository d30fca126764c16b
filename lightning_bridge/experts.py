"""MoE experts as grouped GEMMs: one kernel for all local experts instead of one per expert.

megatron-core's local spec runs the experts one after another (``SequentialMLP``), a pair of small
matmuls per expert; its grouped alternatives need Transformer Engine or the ``grouped_gemm``
package. :class:`GroupedExperts` keeps ``SequentialMLP``'s parameters (the same names, so
conversion, checkpoints and Megatron's DDP are unchanged) and, on CUDA, runs each of the two
projections as one ``torch._grouped_mm`` over the tokens of every local expert. Elsewhere (the
CPU, biased experts, fp8) it is ``SequentialMLP`` itself.

``provider.expert_backend`` chooses: "auto" (grouped where it can run), "grouped", "sequential".
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

logger = logging.getLogger(__name__)

EXPERT_BACKENDS = ("auto", "grouped", "sequential")


def check_expert_backend(backend: str) -> None:
    """Refuse an unknown ``expert_backend`` by name before anything is built."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"expert_backend={backend!r} is not one of {EXPERT_BACKENDS}. Use 'auto' (grouped "
                         "GEMMs on a Hopper-or-newer GPU, one expert after another elsewhere).")


class GroupedExperts(SequentialMLP):
    """``SequentialMLP`` whose forward runs all local experts as two grouped GEMMs on CUDA."""

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        if not self._grouped(permuted_local_hidden_states):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        try:
            return self._grouped_forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        except RuntimeError as exc:  # a GPU or torch build without the kernel: sequential from now on
            if getattr(self.config, "expert_backend", "auto") == "grouped":
                raise
            logger.warning("Grouped-GEMM experts failed on this GPU (%s); running the experts one after "
                           "another from now on (expert_backend='sequential' skips the attempt).", exc)
            self.config.expert_backend = "sequential"
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    def _grouped_forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor,
                         permuted_probs: torch.Tensor):
        ends = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])  # [E, F(x2), H]
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])  # [E, H, F]
        intermediate = torch._grouped_mm(hidden, fc1.transpose(-2, -1), offs=ends)
        intermediate = self._activate(intermediate, permuted_probs)
        return torch._grouped_mm(intermediate, fc2.transpose(-2, -1), offs=ends), None

    def _grouped(self, hidden: torch.Tensor) -> bool:
        config = self.config
        backend = getattr(config, "expert_backend", "auto")
        if backend == "sequential" or not hidden.is_cuda or self.num_local_experts == 1:
            return False
        usable = (hasattr(torch, "_grouped_mm") and hidden.dtype == torch.bfloat16 and not config.add_bias_linear
                  and not (config.fp8 or config.fp4) and not config.moe_apply_probs_on_input)
        if backend == "grouped" and not usable:
            raise ValueError(
                "expert_backend='grouped' needs bf16 activations, experts without biases and no fp8, and "
                "torch._grouped_mm (torch >= 2.8). Use expert_backend='auto' to fall back to sequential experts."
            )
        return usable

    def _activate(self, intermediate: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The expert MLP's activation then the router's per-token weight, as megatron-core's MLP does."""
        config = self.config
        if config.gated_linear_unit:
            gate, linear = torch.chunk(intermediate, 2, dim=-1)
            if (clamp := config.activation_func_clamp_value) is not None:
                gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
            activated = config.activation_func(gate) * (linear + config.glu_linear_offset)
        else:
            activated = (config.activation_func or F.gelu)(intermediate)
        return (activated * probs.unsqueeze(-1)).to(intermediate.dtype)
