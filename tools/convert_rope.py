"""
Convert a checkpoint written before the rotate-half rope layout, once:

    python tools/convert_rope.py --ckpt=out-old/ckpt.pt --out=out-old/ckpt_half.pt

Older versions rotated the dims (2i, 2i+1) of a head together; attention.rope now pairs dims i and i + D/2, as
GPT-NeoX and LLaMA do. Moving those query and key rows of c_attn to (i, i + D/2) gives the same model in today's
layout, exactly: every score q.k is a sum over the same pairs. Infini always had today's layout, and the other
position schemes rotate nothing. The optimizer state is not converted, so a converted run is fine-tuned from
(train.py --init_from=PATH), not resumed.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: this script runs as python tools/convert_rope.py
from checkpoints import ROPE_LAYOUT, save_checkpoint  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from devices import run_script  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
ckpt = ''  # the old checkpoint
out = ''   # where the converted one goes (a new file)
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------


def to_rotate_half(checkpoint):
    """The checkpoint with the query and key rows of every c_attn moved from pairs (2i, 2i+1) to (i, i + D/2)."""
    args = checkpoint['model_args']
    n_head, head_size = args['n_head'], args.get('head_size') or args['n_embd'] // args['n_head']
    width = n_head * head_size
    within = torch.cat((torch.arange(0, head_size, 2), torch.arange(1, head_size, 2)))  # new dim j <- old within[j]
    heads = (torch.arange(2 * n_head)[:, None] * head_size + within).flatten()  # the q and k rows of every head
    order = torch.cat((heads, torch.arange(2 * width, 3 * width)))  # the values stay
    model = {k: v[order] if k.endswith(('attn.c_attn.weight', 'attn.c_attn.bias')) else v
             for k, v in checkpoint['model'].items()}
    kept = {k: v for k, v in checkpoint.items() if k not in ('model', 'optimizer')}
    return {**kept, 'model': model, 'rope_layout': ROPE_LAYOUT}


def main(argv):
    settings, _ = configure(argv, FLAGS, __doc__)
    if not settings.ckpt or not settings.out:
        raise SystemExit('give the old checkpoint and a new file: --ckpt=PATH --out=NEW_PATH')
    if os.path.exists(settings.out):
        raise SystemExit(f'--out={settings.out} exists; give a new file')
    try:
        checkpoint = torch.load(settings.ckpt, map_location='cpu', weights_only=True)
        args = checkpoint['model_args']
    except Exception as e:
        raise SystemExit(f'{settings.ckpt} is not a readable checkpoint ({type(e).__name__})') from None
    rotated = args.get('positions') == 'rope' and args.get('attention') != 'infini'
    if checkpoint.get('rope_layout') == ROPE_LAYOUT or not rotated:
        raise SystemExit(f'{settings.ckpt} needs no conversion: it loads as it is')
    save_checkpoint(to_rotate_half(checkpoint), settings.out)
    print(f'wrote {settings.out}: fine-tune from it with python train.py --init_from={settings.out} --out_dir=NEW')


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
