"""What one transformer layer is made of: its matmuls, parameters and saved activations.

Everything is per accelerator for one micro-batch, after tensor (tp), context (cp) and
expert (ep) sharding. FLOP counts follow Narayanan et al. 2021 / Korthikanti et al. 2022
(attention includes the full sequence-squared term, as those kernels computed it);
activation bytes follow Korthikanti et al. 2022, generalized to GQA, SwiGLU and MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

from exaflop.plan.catalog import ModelSpec

BYTES = 2  # bf16/fp16 activations and weights (fp8 runs keep bf16 copies in memory)


@dataclass(frozen=True)
class Matmul:
    name: str
    m: int  # rows of the output (tokens)
    n: int  # columns of the output
    k: int  # contraction
    batch: int = 1  # independent matmuls of this shape (attention heads, local experts)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch


def gated(model: ModelSpec) -> bool:
    """SwiGLU / GeGLU: a gate and an up projection where GeLU has one matmul."""
    return model.mlp in ("swiglu", "geglu")


def mlp_width(model: ModelSpec, ffn: int) -> int:
    """Output width of the MLP's first matmul: a gated MLP fuses gate and up projections."""
    return 2 * ffn if gated(model) else ffn


def attention_matmuls(model: ModelSpec, mb: int, seq: int, tp: int, cp: int) -> list[Matmul]:
    tokens = mb * seq // cp
    hd, heads = model.head_dim, max(model.heads // tp, 1)
    kv_width = 2 * model.kv_heads * hd
    s_q = seq // cp  # each context-parallel rank owns seq/cp queries and sees all keys
    return [
        Matmul("qkv", tokens, (model.attn_width + kv_width) // tp, model.hidden),
        Matmul("scores", s_q, seq, hd, mb * heads),
        Matmul("context", s_q, hd, seq, mb * heads),
        Matmul("proj", tokens, model.hidden, model.attn_width // tp),
    ]


def mlp_matmuls(model: ModelSpec, mb: int, seq: int, tp: int, cp: int, ep: int, moe: bool) -> list[Matmul]:
    tokens = mb * seq // cp
    h = model.hidden
    if not moe:
        f = model.ffn // tp
        return [Matmul("mlp_up", tokens, mlp_width(model, f), h), Matmul("mlp_down", tokens, h, f)]
    f = (model.expert_ffn or model.ffn) // tp
    local_experts = max(model.experts // ep, 1)
    # Balanced routing: the ep ranks' tokens x top_k copies spread evenly over all experts.
    per_expert = max(tokens * model.top_k * ep // model.experts, 1)
    out = [
        Matmul("router", tokens, model.experts, h),
        Matmul("expert_up", per_expert, mlp_width(model, f), h, local_experts),
        Matmul("expert_down", per_expert, h, f, local_experts),
    ]
    if model.shared_experts:
        fs = f * model.shared_experts
        out += [Matmul("shared_up", tokens, mlp_width(model, fs), h), Matmul("shared_down", tokens, h, fs)]
    return out


def logits_matmul(model: ModelSpec, mb: int, seq: int, tp: int, cp: int) -> Matmul:
    return Matmul("logits", mb * seq // cp, model.vocab // tp, model.hidden)


def forward_flops(model: ModelSpec, seq: int) -> float:
    """Model FLOPs of one sequence's forward pass, unsharded (the MFU numerator / 3)."""
    total = sum(x.flops for x in attention_matmuls(model, 1, seq, 1, 1)) * model.layers
    dense_layers = model.layers - model.moe_layers
    total += sum(x.flops for x in mlp_matmuls(model, 1, seq, 1, 1, 1, False)) * dense_layers
    if model.moe:
        total += sum(x.flops for x in mlp_matmuls(model, 1, seq, 1, 1, 1, True)) * model.moe_layers
    return total + logits_matmul(model, 1, seq, 1, 1).flops


def mlp_params(model: ModelSpec, ffn: int) -> int:
    return (mlp_width(model, ffn) + ffn) * model.hidden


def layer_params(model: ModelSpec, moe: bool) -> tuple[int, int]:
    """(dense parameters, expert parameters) of one layer, unsharded."""
    h = model.hidden
    aw = model.attn_width
    attn = h * (aw + 2 * model.kv_heads * model.head_dim) + aw * h + 2 * h  # + two norms
    if not moe:
        return attn + mlp_params(model, model.ffn), 0
    fe = model.expert_ffn or model.ffn
    shared = mlp_params(model, fe) * model.shared_experts
    return attn + shared + h * model.experts, mlp_params(model, fe) * model.experts


def embedding_params(model: ModelSpec) -> int:
    return model.vocab * model.hidden * (1 if model.tie_embeddings else 2)


def total_params(model: ModelSpec) -> tuple[float, float]:
    """(total, active per token) parameter counts."""
    dense, _ = layer_params(model, False)
    total = active = dense * (model.layers - model.moe_layers) + embedding_params(model)
    if model.moe:
        d, e = layer_params(model, True)
        total += (d + e) * model.moe_layers
        active += (d + e * model.top_k / model.experts) * model.moe_layers
    return total, active


def activation_bytes(model: ModelSpec, mb: int, seq: int, tp: int, cp: int, sp: bool,
                     moe: bool, keep_scores: bool) -> tuple[float, float]:
    """Bytes one layer saves for backward: (all of it, the attention-core part).

    Korthikanti et al. count sbh*(10 + 24/t) + 5*a*s^2*b/t for GPT; here the 24 is
    spelled out per tensor so GQA, SwiGLU and MoE change it correctly. The replicated
    10*sbh (norm inputs, matmul inputs, dropout masks) is split over tp only under
    sequence parallelism. `keep_scores` is False for flash attention, which stores no
    s x s matrix.
    """
    s = seq // cp
    sbh = s * mb * model.hidden
    kv = model.kv_heads / model.heads
    replicated = 10 * sbh
    attn = s * mb * model.attn_width
    sharded = BYTES * attn * (1 + 2 * kv) + BYTES * attn  # Q, K, V; output-projection input
    if moe:
        ffn = (model.expert_ffn or model.ffn) * (model.top_k + model.shared_experts)
    else:
        ffn = model.ffn
    # GeLU saves its input and output; SwiGLU saves gate, up and their product.
    sharded += BYTES * s * mb * ffn * (3 if gated(model) else 2)
    core = 5 * model.heads * s * seq * mb if keep_scores else 0
    total = replicated / (tp if sp else 1) + sharded / tp + core / tp
    return total, core / tp


def elementwise_bytes(model: ModelSpec, mb: int, seq: int, tp: int, cp: int, sp: bool, moe: bool) -> float:
    """Bytes of one layer's saved activations that elementwise ops can recompute cheaply from
    what stays saved: the two norms' outputs (the QKV and first-MLP inputs, 2 sbh bytes each,
    recomputed from the norms' inputs) and the MLP's activation output (GeLU(x), or SwiGLU's
    product, recomputed from the first matmul's output). What modern selective recompute
    (Megatron's fine-grained recompute of norms and activations, torchtitan's op-level policy
    that keeps matmul outputs) drops."""
    s = seq // cp
    norms = 2 * BYTES * s * mb * model.hidden / (tp if sp else 1)
    if moe:
        ffn = (model.expert_ffn or model.ffn) * (model.top_k + model.shared_experts)
    else:
        ffn = model.ffn
    return norms + BYTES * s * mb * ffn / tp

