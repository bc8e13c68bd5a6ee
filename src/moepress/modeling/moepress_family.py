"""The supported MoE families: one row of facts each, and the routed-expert arithmetic they imply.

This is the single place where per-family knowledge is written. `moepress.arch` builds its
`FamilySpec` from `FAMILY_FACTS`, and the custom blocks of this package read the same rows. It
ships inside checkpoints (auto_map code copied beside the weights), so it imports only torch and
transformers. Adding a family = one `Family` row here, checked against that family's
transformers 5 modeling file (ENVIRONMENT.md §2), + one row in the tiny-config table
(`moepress/testing/tiny.py`).

A routed expert computes `E(x) = W_down g(W_gate x + b_gate, W_up x + b_up) + b_down`, `g` the
family's gated activation. Two conventions hold its weights:

- the *view* convention (what methods see), weights as `[out, in]`: gate, up `[.., I, H]`,
  down `[.., H, I]`, biases `[.., I]` / `[.., H]` (or None);
- the *stored* layout of the experts module (`expert_layout`):
  `fused`: gate_up_proj `[.., 2I, H]` (gate rows first), down_proj `[.., H, I]`;
  `interleaved_transposed` (gpt-oss): gate_up_proj `[.., H, 2I]` (gate = `[..., ::2]`,
  up = `[..., 1::2]`), gate_up_proj_bias `[.., 2I]` interleaved alike, down_proj `[.., I, H]`,
  down_proj_bias `[.., H]`.
`ExpertFormat.pack` / `unpack` convert between the two; `ExpertFormat.forward` runs one expert in
the stored layout with the same operations as the stock experts module, so an expert computed here
equals the stock one bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

EXPERT_LAYOUTS = ("fused", "interleaved_transposed")
ACTIVATIONS = ("swiglu", "clamped_swiglu")
SCORE_KINDS = ("softmax", "sigmoid")
RENORMALISATIONS = ("always", "norm_topk_prob", "never")
GROUP_LIMITS = ("never", "always", "group_limited_greedy")


@dataclass(frozen=True)
class Family:
    """Static facts about one MoE family in transformers 5 (the block at `model.layers[i].<block_attr>`).

    Attributes:
        model_type: `config.model_type` served.
        causal_lm_class: the stock `transformers` CausalLM class name.
        expert_count_key: config key written to config.json for the number of routed experts.
        block_attr: decoder-layer attribute holding the MoE block in memory (`mlp` in every family
            transformers 5 ships; `block_of`/`set_block` read and write it, nothing else names it).
        router_attr: block attribute holding the router (`gate` or `router`).
        expert_layout: stored layout of the routed experts (`EXPERT_LAYOUTS`, module doc).
        expert_biases: the routed experts have gate/up/down biases.
        activation: `swiglu` (`act(gate) * up`, `config.hidden_act`) or `clamped_swiglu`
            (gpt-oss, `config.swiglu_alpha` / `config.swiglu_limit`).
        score_kind: per-expert router score before top-k: `softmax` over all experts or
            independent `sigmoid` (DeepSeek-V3).
        renormalise: whether the top-k weights are divided by their sum: `always`, `never`, or
            `norm_topk_prob` (as the config's `norm_topk_prob` says).
        group_limited: when top-k is group-limited: `never`, `always` (DeepSeek-V3: `n_group` groups,
            the best `topk_group` groups by their top-2 score sum), or `group_limited_greedy`
            (DeepSeek-V2: only when `config.topk_method == "group_limited_greedy"`, groups scored
            by their best expert).
        group_score_experts: experts per group that score a group (2 = top-2 sum, 1 = max), so
            the fewest experts a group may hold; 0 without group routing.
        routing_scale_key: config key of a factor the top-k weights are multiplied by, or None.
        shared_expert_attrs: block attributes holding shared experts and their gate (never
            compressed; a custom block adopts them unchanged).
        shared_expert_gate: the attribute among those that is a sigmoid gate on the shared
            expert's output (Qwen2-MoE), or None.
        block_returns_tuple: the block returns `(hidden, router_scores)` (gpt-oss).
        router_buffers: per-expert router tensors besides `weight`, sliced with it.
        hub_block, hub_expert_names: the per-expert layout `save_pretrained` writes by default,
            `{layer}.{hub_block}.experts.{j}.{gate|up|down}.weight` (None: the fused in-memory
            keys are the disk keys, as for gpt-oss).
        notes: routing summary for people (`moepress inspect`, errors).
    """

    model_type: str
    causal_lm_class: str
    expert_count_key: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    expert_layout: str = "fused"
    expert_biases: bool = False
    activation: str = "swiglu"
    score_kind: str = "softmax"
    renormalise: str = "never"
    group_limited: str = "never"
    group_score_experts: int = 0
    routing_scale_key: str | None = None
    shared_expert_attrs: tuple[str, ...] = ()
    shared_expert_gate: str | None = None
    block_returns_tuple: bool = False
    router_buffers: tuple[str, ...] = ()
    hub_block: str = "mlp"
    hub_expert_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")
    notes: str = ""

    def __post_init__(self):
        for name, allowed in (("expert_layout", EXPERT_LAYOUTS), ("activation", ACTIVATIONS),
                              ("score_kind", SCORE_KINDS), ("renormalise", RENORMALISATIONS),
                              ("group_limited", GROUP_LIMITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{self.model_type}: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def block_of(self, layer):
        """The MoE (or dense MLP) block of decoder layer `layer`, or None."""
        return getattr(layer, self.block_attr, None)

    def set_block(self, layer, block) -> None:
        """Install `block` as decoder layer `layer`'s MoE block."""
        setattr(layer, self.block_attr, block)


FAMILY_FACTS: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "mixtral", "MixtralForCausalLM", "num_local_experts",
            renormalise="always",
            hub_block="block_sparse_moe", hub_expert_names=("w1", "w3", "w2"),
            notes="softmax over E -> top-k -> renormalise",
        ),
        Family(
            "qwen2_moe", "Qwen2MoeForCausalLM", "num_experts",
            renormalise="norm_topk_prob",
            shared_expert_attrs=("shared_expert", "shared_expert_gate"), shared_expert_gate="shared_expert_gate",
            notes="softmax -> top-k, renormalise iff norm_topk_prob; sigmoid-gated shared expert",
        ),
        Family(
            "qwen3_moe", "Qwen3MoeForCausalLM", "num_local_experts",  # `num_experts` is only an alias
            renormalise="norm_topk_prob",
            notes="softmax -> top-k, renormalise iff norm_topk_prob",
        ),
        Family(
            "olmoe", "OlmoeForCausalLM", "num_experts",
            renormalise="norm_topk_prob",
            notes="softmax -> top-k, renormalise iff norm_topk_prob",
        ),
        Family(
            # the V2 router ignores norm_topk_prob (transformers 5.23 DeepseekV2TopkRouter)
            "deepseek_v2", "DeepseekV2ForCausalLM", "n_routed_experts",
            group_limited="group_limited_greedy", group_score_experts=1,
            routing_scale_key="routed_scaling_factor",
            shared_expert_attrs=("shared_experts",),
            notes="softmax -> (group-limited) top-k x routed_scaling_factor; shared experts; dense first layers",
        ),
        Family(
            "deepseek_v3", "DeepseekV3ForCausalLM", "n_routed_experts",
            score_kind="sigmoid", renormalise="norm_topk_prob",
            group_limited="always", group_score_experts=2,
            routing_scale_key="routed_scaling_factor",
            shared_expert_attrs=("shared_experts",),
            router_buffers=("e_score_correction_bias",),
            notes="sigmoid + e_score_correction_bias, group-limited top-k, x routed_scaling_factor; "
            "shared experts; dense first layers",
        ),
        Family(
            "phimoe", "PhimoeForCausalLM", "num_local_experts",
            router_attr="router",
            hub_block="block_sparse_moe", hub_expert_names=("w1", "w3", "w2"),
            notes="sparsemixer top-2 (weights need not sum to 1)",
        ),
        Family(
            # top-k of the biased logits, then softmax over those k: the weights sum to one by construction
            "gpt_oss", "GptOssForCausalLM", "num_local_experts",
            router_attr="router",
            expert_layout="interleaved_transposed", expert_biases=True, activation="clamped_swiglu",
            block_returns_tuple=True,
            router_buffers=("bias",),
            hub_expert_names=None,
            notes="top-k on biased logits -> softmax over the k; clamped SwiGLU with biases",
        ),
    )
}


def family_facts(model_type: str) -> Family:
    """The row of `model_type`; a clear error naming the supported ones."""
    if model_type not in FAMILY_FACTS:
        raise ValueError(f"no moepress family row for model_type {model_type!r}; known: {', '.join(FAMILY_FACTS)}")
    return FAMILY_FACTS[model_type]


# ---------------------------------------------------------------------------------- activations
def swiglu(gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
    """`act(gate) * up` (SiLU for every SwiGLU family here, taken from `config.hidden_act`)."""
    return act_fn(gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: `(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)` with `g = clamp(gate, max=l)`."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def shared_expert_output(family: Family, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Output of the block's shared expert(s) on flat tokens `x [T, H]` (gate applied), or None."""
    if not family.shared_expert_attrs:
        return None
    out = getattr(block, family.shared_expert_attrs[0])(x)
    if family.shared_expert_gate is not None:
        out = torch.sigmoid(getattr(block, family.shared_expert_gate)(x)) * out
    return out


def expert_parameters(hidden_size: int, intermediate_size: int, biases: bool = False) -> int:
    """Parameters of one routed expert: gate, up `[I, H]`, down `[H, I]` (+ biases `2I + H`)."""
    return 3 * hidden_size * intermediate_size + ((2 * intermediate_size + hidden_size) if biases else 0)


# ---------------------------------------------------------------------------------- experts
class ExpertFormat:
    """How one family's routed experts are stored and computed, with the config's constants.

    Args:
        family: the family row (layout, biases, activation kind).
        config: the model config (`hidden_act`, or `swiglu_alpha` / `swiglu_limit`).
    """

    def __init__(self, family: Family, config):
        self.layout = family.expert_layout
        self.biased = family.expert_biases
        self.interleaved = self.layout == "interleaved_transposed"
        if family.activation == "clamped_swiglu":
            # config fields since transformers 5.2x; before, the experts module hard-coded these values
            self.alpha = float(getattr(config, "swiglu_alpha", 1.702))
            self.limit = float(getattr(config, "swiglu_limit", 7.0))
            self.act_fn = None
        else:
            self.act_fn = ACT2FN[getattr(config, "hidden_act", "silu")]

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The family's gated activation on pre-activations `[.., I]`."""
        if self.act_fn is None:
            return clamped_swiglu(gate, up, self.alpha, self.limit)
        return swiglu(gate, up, self.act_fn)

    def parameters_per_expert(self, hidden_size: int, intermediate_size: int) -> int:
        return expert_parameters(hidden_size, intermediate_size, self.biased)

    # ------------------------------------------------------------------ layout conversion
    def stored_shapes(self, num_experts: int, hidden_size: int, intermediate_size: int) -> dict[str, tuple]:
        """Shapes of the stored expert tensors, keyed like the experts module's parameters."""
        e, h, i = num_experts, hidden_size, intermediate_size
        if self.interleaved:
            shapes = {"gate_up_proj": (e, h, 2 * i), "gate_up_proj_bias": (e, 2 * i),
                      "down_proj": (e, i, h), "down_proj_bias": (e, h)}
        else:
            shapes = {"gate_up_proj": (e, 2 * i, h), "gate_up_proj_bias": (e, 2 * i),
                      "down_proj": (e, h, i), "down_proj_bias": (e, h)}
        return {k: v for k, v in shapes.items() if self.biased or not k.endswith("_bias")}

    def pack(self, gate, up, down=None, gate_bias=None, up_bias=None, down_bias=None) -> dict[str, torch.Tensor]:
        """View convention -> stored tensors, keyed like the experts module's parameters.

        Works with or without the leading expert dim; `down` (and the biases) may be omitted to
        pack gate/up only. Results may be non-contiguous views/copies; callers store `.contiguous()`.
        """
        if self.biased and gate_bias is None:
            raise ValueError("this family's experts have biases: give gate_bias, up_bias (and down_bias)")
        out = {}
        if self.interleaved:
            out["gate_up_proj"] = torch.stack([gate.mT, up.mT], dim=-1).flatten(-2)
            if gate_bias is not None:
                out["gate_up_proj_bias"] = torch.stack([gate_bias, up_bias], dim=-1).flatten(-2)
        else:
            out["gate_up_proj"] = torch.cat([gate, up], dim=-2)
            if gate_bias is not None:
                out["gate_up_proj_bias"] = torch.cat([gate_bias, up_bias], dim=-1)
        if down is not None:
            out["down_proj"] = down.mT if self.interleaved else down
            if down_bias is not None:
                out["down_proj_bias"] = down_bias
        return out

    def unpack(self, gate_up_proj, down_proj=None, gate_up_proj_bias=None, down_proj_bias=None) -> dict:
        """Stored tensors -> view convention `{gate, up, down, gate_bias, up_bias, down_bias}` (views).

        Missing inputs give None entries; works with or without the leading expert dim.
        """
        w, b = gate_up_proj, gate_up_proj_bias
        if self.interleaved:
            gate, up = w[..., ::2].mT, w[..., 1::2].mT
            down = None if down_proj is None else down_proj.mT
            gate_bias, up_bias = (None, None) if b is None else (b[..., ::2], b[..., 1::2])
        else:
            i = w.shape[-2] // 2
            gate, up, down = w[..., :i, :], w[..., i:, :], down_proj
            gate_bias, up_bias = (None, None) if b is None else (b[..., :i], b[..., i:])
        return {"gate": gate, "up": up, "down": down,
                "gate_bias": gate_bias, "up_bias": up_bias, "down_bias": down_proj_bias}

    def stored_expert(self, holder: nn.Module, j: int) -> dict[str, torch.Tensor]:
        """Expert j's stored tensors of a module with `gate_up_proj`, `down_proj` (+ biases),
        as keyword arguments of `forward`."""
        out = {"gate_up": holder.gate_up_proj[j], "down": holder.down_proj[j]}
        if self.biased:
            out["gate_up_bias"] = holder.gate_up_proj_bias[j]
            out["down_bias"] = holder.down_proj_bias[j]
        return out

    # ------------------------------------------------------------------ one expert
    def intermediate(self, x, gate_up, gate_up_bias=None, *, x_up=None) -> torch.Tensor:
        """`h = g(W_gate x + b_gate, W_up x_up + b_up)` `[t, I]` of one expert in the stored layout.

        `x_up` (default `x`) feeds the up projection separately (Compressed Experts scales the two
        inputs differently); without it gate and up are one matmul, as in the stock experts.
        """
        if self.interleaved:
            if x_up is None:
                gu = x @ gate_up if gate_up_bias is None else x @ gate_up + gate_up_bias
                return self.activation(gu[..., ::2], gu[..., 1::2])
            gate, up = x @ gate_up[:, ::2], x_up @ gate_up[:, 1::2]
            if gate_up_bias is not None:
                gate, up = gate + gate_up_bias[::2], up + gate_up_bias[1::2]
            return self.activation(gate, up)
        if x_up is None:
            gu = nn.functional.linear(x, gate_up, gate_up_bias)
            gate, up = gu.chunk(2, dim=-1)
            return self.activation(gate, up)
        i = gate_up.shape[0] // 2
        bias = (None, None) if gate_up_bias is None else (gate_up_bias[:i], gate_up_bias[i:])
        gate = nn.functional.linear(x, gate_up[:i], bias[0])
        up = nn.functional.linear(x_up, gate_up[i:], bias[1])
        return self.activation(gate, up)

    def output(self, h, down, down_bias=None) -> torch.Tensor:
        """`W_down h + b_down` `[t, H]` of one expert in the stored layout."""
        if self.interleaved:
            return h @ down if down_bias is None else h @ down + down_bias
        return nn.functional.linear(h, down, down_bias)

    def forward(self, x, gate_up, down, gate_up_bias=None, down_bias=None, *, x_up=None, mid_scale=None):
        """`E(x) [t, H]` of one expert (no routing weight); `mid_scale [t, I]` scales `h` if given."""
        h = self.intermediate(x, gate_up, gate_up_bias, x_up=x_up)
        if mid_scale is not None:
            h = h * mid_scale
        return self.output(h, down, down_bias)
