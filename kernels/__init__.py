"""Fused Triton kernels for PyTorch: flash attention, LayerNorm and RMSNorm, forward and backward.

`flash_attention`, `layer_norm`, `add_layer_norm`, `rms_norm`, `add_rms_norm` and the `FusedLayerNorm` and
`FusedRMSNorm` modules, and `linear_cross_entropy` (an lm_head's loss without its whole logits), are ordinary
differentiable PyTorch functions (`torch.library` custom ops: `opcheck` and `torch.compile(fullgraph=True)` work);
`patch(model)` loads them into an existing model. `import kernels` needs only torch and triton.

Dispatch: CUDA tensors run the compiled Triton kernels; CPU tensors run them in Triton's interpreter when
TRITON_INTERPRET=1 was set before triton was imported, and an exact PyTorch reference otherwise.
`kernels.utils.last_path(op)` and `dispatch_counts()` tell which ran. `python -m kernels.compile_report`
builds every kernel configuration for sm_80 and sm_90 and prints its registers, spills and shared memory.
"""

from kernels import utils
from kernels.attention import flash_attention, flash_attention_varlen
from kernels.cross_entropy import linear_cross_entropy
from kernels.norm import FusedLayerNorm, FusedRMSNorm, add_layer_norm, add_rms_norm, layer_norm, rms_norm
from kernels.patch import Replacement, Rule, patch, register_rule, unpatch

__all__ = [
    "FusedLayerNorm", "FusedRMSNorm", "Replacement", "Rule", "add_layer_norm", "add_rms_norm", "flash_attention",
    "flash_attention_varlen", "layer_norm", "linear_cross_entropy", "patch", "register_rule", "rms_norm", "unpatch",
    "utils",
]
