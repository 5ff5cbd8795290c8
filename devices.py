"""
How a script runs: the device it runs on and the dtype it computes in (one rule for every script's --device and
--dtype), and how it ends on Ctrl-C or a full disk (run_script).
"""

import os
import signal
import sys
from contextlib import nullcontext

import torch


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def device_type_of(device):
    """'cuda', 'mps' or 'cpu' for a --device flag; a one-line error for a device torch does not know or cannot
    see."""
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError):
        device_type = None
    if device_type not in ('cuda', 'mps', 'cpu'):
        raise SystemExit(f"--device={device}: use cpu, cuda, cuda:N or mps")
    if device_type == 'cuda' and not torch.cuda.is_available():
        build = (" (this torch is a CPU build: a GPU needs a CUDA build of torch, pytorch.org)"
                 if torch.version.cuda is None else "")
        raise SystemExit(f"--device={device} but torch sees no CUDA GPU; use --device=cpu{build}")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit(f"--device={device} but this machine has no Apple GPU (MPS); use --device=cpu")
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


def run_script(main, argv, interrupted="interrupted"):
    """Run a script's main(argv). Ctrl-C, a full disk or a read-only folder end it with one line, not a traceback;
    what the script had written is whole, since every file is written to a temp name and renamed. A reader that
    leaves (--help | head) ends it quietly."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again, caught below
        try:
            return main(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be caught
    except KeyboardInterrupt:
        raise SystemExit(interrupted) from None
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more goes to the closed pipe
        raise SystemExit(1) from None
    except OSError as e:
        raise SystemExit(f"cannot go on: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None

