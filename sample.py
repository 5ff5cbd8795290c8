"""
Sample from a trained model, nanoGPT style; every global below is a flag:

  python sample.py                                           # out/ckpt.pt, prompted with a newline
  python sample.py --out_dir=out-selective --start="def main(" --budget=32
  python sample.py --start=FILE:prompt.txt --max_new_tokens=200
"""

import os
import sys
from contextlib import nullcontext

import torch

from data.common import tokenizer_from_meta
from model import GPT, GPTConfig
from train import configure, load_checkpoint

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out'         # the run whose ckpt.pt to sample from
start = '\n'            # the prompt, or 'FILE:path' to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8       # 1.0 = the model's distribution, lower is more predictable
top_k = 200             # keep only the top_k most likely tokens; 0 = all
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
dtype = ''              # '' = bfloat16 on CUDA where supported, else float16; float32 elsewhere
budget = ''             # selective only: KV entries each layer keeps, an int or one per layer ('8,16,...'); '' = all
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))]
# -----------------------------------------------------------------------------------------------------------


def parse_budget(text, config):
    """The cache options for --budget: {} when off, else {'budget': an int or a list of one int per layer}."""
    if not text:
        return {}
    if config.attention != 'selective':
        raise SystemExit(f"--budget prunes Selective Attention's cache; this checkpoint's attention is "
                         f"'{config.attention}': drop --budget")
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        raise SystemExit(f"--budget={text}: give an int, or a comma list of {config.n_layer} ints (one per layer)")
    return {'budget': values[0] if len(values) == 1 else values}


def main(argv):
    configure(argv, globals(), config_keys)
    torch.manual_seed(seed)
    device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device={device} but torch sees no CUDA GPU; use --device=cpu")
    ptdtype = dtype or ('bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
                        else 'float16' if device_type == 'cuda' else 'float32')
    ctx = nullcontext() if ptdtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, ptdtype))

    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train one first (python train.py --out_dir={out_dir}), or "
                         f"set --out_dir to a run's folder")
    checkpoint = load_checkpoint(path)
    config = GPTConfig(**checkpoint['model_args'])
    model = GPT(config)
    model.load_state_dict(checkpoint['model'])
    model.eval().to(device)
    tok = tokenizer_from_meta(checkpoint['tokenizer'])
    cache_options = parse_budget(budget, config)

    prompt = start
    if start.startswith('FILE:'):
        path = start[len('FILE:'):]
        if not os.path.isfile(path):
            raise SystemExit(f"--start=FILE:{path}: no such file")
        with open(path, encoding='utf-8', errors='replace') as f:
            prompt = f.read()
    try:
        ids = tok.encode(prompt)
    except ValueError as e:  # a character the char-level vocabulary lacks
        raise SystemExit(str(e)) from None
    if not ids:
        raise SystemExit("--start is empty: give at least one character to start from")
    if len(ids) > config.block_size and not model.streams:
        print(f"the prompt has {len(ids)} tokens, more than block_size={config.block_size}: the model sees its "
              f"last {config.block_size}")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]

    with torch.no_grad(), ctx:
        for _ in range(num_samples):
            try:
                y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                   **cache_options)
            except ValueError as e:  # e.g. a budget the cache refuses
                raise SystemExit(str(e)) from None
            print(tok.decode(y[0].tolist()))
            print('---------------')


if __name__ == '__main__':
    main(sys.argv[1:])
