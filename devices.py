"""
The device a script runs on and the dtype it computes in: one rule for every script's --device and --dtype.
"""

from contextlib import nullcontext

import torch


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def device_type_of(device):
    """'cuda', 'mps' or 'cpu' for a --device flag; a one-line error for a CUDA device torch cannot see."""
    device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device={device} but torch sees no CUDA GPU; use --device=cpu")
    return device_type


def resolve_dtype(dtype, device_type):
    """The --dtype flag's name, '' meaning: bfloat16 on CUDA where the GPU has it natively, else float16 there;
    float32 elsewhere."""
    if not dtype:
        if device_type != 'cuda':
            return 'float32'
        return 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype={dtype}: use float32, bfloat16 or float16")
    return dtype


def autocast(device_type, dtype):
    """Mixed precision for a dtype name: none in float32."""
    return nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))


