"""How much of the datasheet an accelerator achieves: matmuls, memory-bound ops, links.

One small model for every row and every accelerator, fitted once (not per row) by
`exaflop plan calibrate` on the published runs in plan/catalog/calibration.csv:

    matmul efficiency(M, N, K) = gemm_peak * g(M) * g(N) * g(K),   g(x) = x / (x + gemm_knee)

`gemm_peak` is the best fraction of the tensor-core peak a large, well-shaped matmul
reaches; `gemm_knee` models why small dimensions fall short of it: a thin
dimension leaves tiles partly empty and the fixed per-tile prologue/epilogue is
amortized over fewer multiply-adds. Memory-bound kernels (norms, softmax, dropout,
the optimizer step) run at `mem_eff` of the peak HBM bandwidth; collectives reach
`net_eff` of the link bandwidth (NCCL bus bandwidth over line rate).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Efficiency:
    gemm_peak: float
    gemm_knee: float
    mem_eff: float
    net_eff: float

    def gemm(self, m: float, n: float, k: float) -> float:
        knee = self.gemm_knee
        return self.gemm_peak * (m / (m + knee)) * (n / (n + knee)) * (k / (k + knee))


# Fitted by `python -m exaflop.plan calibrate` (coordinate search minimizing the mean
# absolute step-time error plus a quarter of the worst, over the 28 rows of
# plan/catalog/calibration.csv: 2021-24, A100 / H100 / H800, BF16 and FP8, dense and MoE).
# Re-fit and paste here when the cost model changes. `exaflop plan validate --cross`
# re-fits without each source in turn, starting from NEUTRAL, to measure what the
# constants do on runs they were not fitted to.
CALIBRATED = Efficiency(gemm_peak=0.745, gemm_knee=118.0, mem_eff=0.9, net_eff=0.9)
NEUTRAL = Efficiency(gemm_peak=0.8, gemm_knee=32.0, mem_eff=0.8, net_eff=0.8)
