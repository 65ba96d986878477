from exaflop.nn.decode import CacheView, KVCache
from exaflop.nn.layers import (
    Attention,
    Block,
    MoE,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attend,
    rope_tables,
)

__all__ = ["Attention", "Block", "CacheView", "KVCache", "MoE", "RMSNorm", "SwiGLU", "apply_rope", "attend",
           "rope_tables"]
