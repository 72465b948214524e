"""Mixed precision: bf16 autocast by default on GPU (no loss scaling needed), fp16 with a gradient
scaler as an option, plain fp32 on CPU."""
import torch

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def resolve_precision(precision, device):
    """'auto' means bf16 on CUDA and fp32 elsewhere."""
    if precision == 'auto':
        return 'bf16' if device.type == 'cuda' else 'fp32'
    return precision


def autocast(precision, device):
    return torch.autocast(device.type, dtype=DTYPES.get(precision, torch.float32), enabled=precision in DTYPES)


def grad_scaler(precision, device):
    """A real scaler only for fp16; a disabled one (a no-op pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
