from exaflop.nn.layers import (
    Attention,
    Block,
    KVCache,
    MoE,
    RMSNorm,
    SwiGLU,
    apply_rope,
    rope_tables,
)

__all__ = ["Attention", "Block", "KVCache", "MoE", "RMSNorm", "SwiGLU", "apply_rope", "rope_tables"]
