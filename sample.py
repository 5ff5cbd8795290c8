"""
Sample from a trained model, nanoGPT style; every global below is a flag:

  python sample.py                                           # out/ckpt.pt, prompted with a newline
  python sample.py --ckpt=out-selective/ckpt.pt --start="def main(" --budget=32
  python sample.py --start=FILE:prompt.txt --max_new_tokens=200
  python sample.py --init_from=gpt2 --start="It was a dark and stormy night"   # GPT-2 itself (docs/gpt2.md)
"""

import math
import os
import signal
import sys

if __name__ == '__main__':  # Ctrl-C while torch loads ends with one line; run_script (devices.py) takes over
    signal.signal(signal.SIGINT, lambda *_: sys.exit('interrupted while starting: nothing was written'))

import torch

from checkpoints import load_model
from configurator import configure, flags_of, parse_ints
from data.tokenizers import checkpoint_tokenizer, encode_prompt
from devices import autocast, default_device, device_type_of, resolve_dtype, run_script
from tools.gpt2 import is_gpt2, load_model as load_gpt2

# -----------------------------------------------------------------------------------------------------------
ckpt = 'out/ckpt.pt'    # the checkpoint to sample from (train.py writes out_dir/ckpt.pt)
init_from = ''          # '' = --ckpt; gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local GPT-2 folder
start = '\n'            # the prompt, or 'FILE:path' to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8       # 1.0 = the model's distribution, lower is more predictable, 0 = always the likeliest
top_k = 200             # keep only the top_k most likely tokens; 0 = all
seed = 1337
device = ''             # '' = cuda if available, else mps, else cpu (devices.default_device)
dtype = ''              # '' = bfloat16 on CUDA where supported, else float16; float32 elsewhere
budget = ''             # selective only: KV entries each layer keeps, an int or one per layer ('8,16'); '' = all
evict = 'F'             # selective with a budget: evict the most masked entry ('F') or the oldest ('window')
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------


def main(argv):
    out_dir = next((arg.split('=', 1)[1] for arg in argv if arg.startswith('--out_dir=')), None)
    if out_dir is not None:  # nanoGPT's sample.py takes --out_dir; here the checkpoint is named
        raise SystemExit(f"sample.py reads a checkpoint file: --ckpt={os.path.join(out_dir, 'ckpt.pt')}")
    cfg, _ = configure(argv, FLAGS, __doc__)
    check_sampling(cfg.temperature, cfg.top_k, cfg.max_new_tokens)
    if cfg.num_samples < 0 or cfg.seed < 0:
        raise SystemExit("--num_samples and --seed must be >= 0")
    torch.manual_seed(cfg.seed)
    device = cfg.device or default_device()
    device_type = device_type_of(device)
    ctx = autocast(device_type, resolve_dtype(cfg.dtype, device_type))
    path = cfg.ckpt
    if cfg.init_from and not is_gpt2(cfg.init_from):
        raise SystemExit(f"--init_from={cfg.init_from}: give gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local GPT-2 "
                         f"folder (a run's checkpoint is read with --ckpt)")
    if not cfg.init_from and not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train one first (python train.py --out_dir=DIR writes "
                         f"DIR/ckpt.pt), or set --ckpt to a run's ckpt.pt")
    model, checkpoint = load_gpt2(cfg.init_from, device) if cfg.init_from else load_model(path, device)
    config = model.config
    tok = checkpoint_tokenizer(checkpoint, path)
    cache_options = inference_options(model, cfg.budget, cfg.evict)

    ids = encode_prompt(cfg.start, tok)
    if len(ids) > config.block_size and not model.streams:
        print(f"the prompt has {len(ids)} tokens, more than block_size={config.block_size}: the model sees its "
              f"last {config.block_size}")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]

    with torch.no_grad(), ctx:
        for _ in range(cfg.num_samples):
            try:
                y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                   **cache_options)
            except ValueError as e:  # e.g. a budget the cache refuses
                raise SystemExit(str(e)) from None
            print(tok.decode(y[0].tolist()))
            print('---------------')


def check_sampling(temperature, top_k, max_new_tokens):
    """One line for sampling settings no generation could use."""
    if not math.isfinite(temperature) or temperature < 0:
        raise SystemExit(f"--temperature={temperature} must be a finite number >= 0 (0 is greedy decoding)")
    if 0 < temperature < 1e-3:  # logits divided by it overflow to inf: the softmax is no distribution
        raise SystemExit(f"--temperature={temperature:g} is too small to sample with; 0 takes the likeliest token")
    if top_k < 0 or max_new_tokens < 0:
        raise SystemExit("--top_k and --max_new_tokens must be >= 0 (top_k 0 keeps every token)")


def inference_options(model, budget, evict='F'):
    """The attention options of the --budget and --evict flags, {} when both are at their defaults ('', 'F'):
    budget an int or one per layer. The model's cache checks them: a one-line error for an attention that takes no
    budget, a budget below 2 or an unknown eviction rule."""
    if evict != 'F' and not budget:
        raise SystemExit(f"--evict={evict} chooses what a pruned cache drops; it needs --budget=N (selective only)")
    options = {}
    if budget:
        values = parse_ints('budget', budget, '32 or 8,16,16,8 (one per layer)')
        options['budget'] = values[0] if len(values) == 1 else values
    if budget or evict != 'F':
        options['evict'] = evict
    try:
        model.new_cache(1, **options)  # allocates nothing: a cache checks its options when it is made
    except ValueError as e:
        flags = ' '.join(f'--{key}={value}' for key, value in (('budget', budget), ('evict', evict))
                         if key in options and (key != 'evict' or value != 'F'))
        raise SystemExit(f"{flags}: {e}") from None
    return options


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
