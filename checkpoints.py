"""
Checkpoints: read one with a one-line error when it cannot be, build its model, write one atomically.
"""

import os
import warnings

import torch

from model import GPT, GPTConfig

ROPE_LAYOUT = 'half'  # attention.rope pairs dims i and i + D/2; train.py marks its checkpoints with it


def load_checkpoint(path):
    """A checkpoint dict (its tensors on the CPU, whatever device wrote them), or a one-line error saying why it
    cannot be read."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before failing on it: the error says it
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        reason = ('' if isinstance(checkpoint, dict) and {'model', 'model_args'} <= checkpoint.keys()
                  and isinstance(checkpoint['model_args'], dict) else "no 'model' and 'model_args' in it")
    except PermissionError:
        raise SystemExit(f"cannot read {path}: permission denied") from None
    except Exception:  # torch's messages here (a paragraph on weights_only, a zip reader's, an IndexError) say little
        reason = 'not a complete torch.save file of tensors and plain values'
    if reason:
        raise SystemExit(f"{path} is not a readable checkpoint ({reason}); it may be truncated or from another "
                         f"program: train again or point at another file")
    if not isinstance(checkpoint['model'], dict) or not all(torch.is_tensor(t) for t in checkpoint['model'].values()):
        raise SystemExit(f"{path} is not a readable checkpoint (its 'model' is not a state_dict of tensors)")
    if not all(torch.isfinite(t).all() for t in checkpoint['model'].values() if torch.is_floating_point(t)):
        raise SystemExit(f"{path} holds NaN or infinite weights: the run that wrote it diverged; train again with "
                         f"a lower --learning_rate")
    # checkpoints written before GPTConfig had a positions field all used GPT-2's learned table
    checkpoint['model_args'].setdefault('positions', 'learned')
    # a compiled model's state_dict names its weights _orig_mod.*
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    args = checkpoint['model_args']
    rotates = args['positions'] == 'rope' and args.get('attention') != 'infini'  # Infini had today's layout
    if rotates and checkpoint.get('rope_layout') != ROPE_LAYOUT:
        raise SystemExit(f"{path} rotates the older rope layout (pairs 2i, 2i+1): convert it once with python "
                         f"tools/convert_rope.py --ckpt={path} --out=NEW.pt")
    return checkpoint


def load_model(path, device='cpu', **overrides):
    """The eval-mode GPT of a checkpoint on device, and the checkpoint dict. overrides change model settings that
    do not touch the weights (use_kernels, dropout)."""
    checkpoint = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **overrides}))
        model.load_state_dict(checkpoint['model'])
    except (TypeError, ValueError, RuntimeError) as e:  # settings or weights from another version of model.py
        raise SystemExit(f"cannot build the model of {path} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return model.to(device).eval(), checkpoint


def save_checkpoint(checkpoint, path):
    """Write to a temp file in the same folder, fsync, then rename over path: the rename is atomic, so a run
    killed mid-write leaves the previous checkpoint whole. train.py's lock on out_dir keeps a second run from
    writing the same temp file."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk (torch.save's zip writer says RuntimeError), a folder gone
        if os.path.exists(tmp):
            os.remove(tmp)  # the previous checkpoint is still whole; the half-written one must not fill the disk
        why = getattr(e, 'strerror', None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"cannot write {path} ({why}); the checkpoint there before, if any, is untouched") from None
