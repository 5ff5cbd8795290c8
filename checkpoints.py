"""
Checkpoints: read one with a one-line error when it cannot be, build its model, write one atomically.
"""

import os

import torch

from model import GPT, GPTConfig


def load_checkpoint(path):
    """A checkpoint dict (its tensors on the CPU, whatever device wrote them), or a one-line error saying why it
    cannot be read."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
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
    # checkpoints written before GPTConfig had a positions field all used GPT-2's learned table
    checkpoint['model_args'].setdefault('positions', 'learned')
    # a compiled model's state_dict names its weights _orig_mod.*
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    if checkpoint.get('rope_layout') != ROPE_LAYOUT:
        to_rotate_half(checkpoint)
    return checkpoint


ROPE_LAYOUT = 'half'  # positions.rope pairs dims i and i + D/2; train.py marks its checkpoints with it


def to_rotate_half(checkpoint):
    """Checkpoints written before the rotate-half layout rotated the dims (2i, 2i+1) of a head together. Moving
    those query and key rows of c_attn to (i, i + D/2) gives the same model in today's layout, exactly: every
    score q.k is a sum over the same pairs. Infini always had today's layout, and the other schemes no rotation."""
    args = checkpoint['model_args']
    if args.get('positions') != 'rope' or args.get('attention') == 'infini':
        checkpoint['rope_layout'] = ROPE_LAYOUT
        return
    n_head, head_size = args['n_head'], args.get('head_size') or args['n_embd'] // args['n_head']
    width = n_head * head_size
    within = torch.cat((torch.arange(0, head_size, 2), torch.arange(1, head_size, 2)))  # new dim j <- old within[j]
    heads = (torch.arange(2 * n_head)[:, None] * head_size + within).flatten()  # the q and k rows of every head
    order = torch.cat((heads, torch.arange(2 * width, 3 * width)))  # the values stay
    for key, tensor in checkpoint['model'].items():
        if key.endswith('attn.c_attn.weight') or key.endswith('attn.c_attn.bias'):
            checkpoint['model'][key] = tensor[order]
    checkpoint['rope_layout'] = ROPE_LAYOUT
    checkpoint['converted'] = True  # its optimizer state is not: train.py refuses to resume it


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
    killed mid-write leaves the previous checkpoint whole."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
