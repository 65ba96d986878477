from exaflop.nn.decode import CacheView, KVCache
from exaflop.nn.layers import (
    Attention,
    Block,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attend,
    rope_tables,
)
from exaflop.nn.moe import MoE, grouped_mm

__all__ = ["Attention", "Block", "CacheView", "KVCache", "MoE", "RMSNorm", "SwiGLU", "apply_rope", "attend",
           "grouped_mm", "rope_tables"]
