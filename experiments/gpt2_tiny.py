"""
What each attention does to a GPT-2 it starts from, at a learner's scale on a CPU (docs/gpt2.md). The real GPT-2
needs the internet and a GPU; this stands in a tiny one: a causal GPT with GPT-2's layout (learned position table,
tanh GELU; 4 layers, 128 wide, 256 bytes of context) trained by train.py on the default data, then saved in the
Hugging Face layout (gpt2.save_pretrained). Each attention loads it through gpt2.py, the --init_from=gpt2 path,
and its val loss is measured before and after a short fine-tune on the same data.

  python experiments/gpt2_tiny.py
  python experiments/gpt2_tiny.py --finetune_iters=400 --attentions=selective

The fine-tune is a plain AdamW loop here (train.py would refuse the byte-level data: GPT-2 reads GPT-2's BPE).
It uses train.py's batches and loss estimate: the same 20 val batches of 8 x 256 tokens for every number.
"""
import os
import sys
import types
from contextlib import nullcontext

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools import gpt2  # noqa: E402
from checkpoints import load_model  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from experiments.common import finished, run_train  # noqa: E402
from runs import attention_stats  # noqa: E402
from train import estimate_loss, get_batch  # noqa: E402

out_dir = 'out-gpt2-tiny'       # the tiny GPT-2's run, its Hugging Face folder and results.md
data_dir = ''                   # '' = data/python_stdlib, train.py's default data
attentions = 'causal,selective,in,infini,infini0'  # infini0: Infini with its gates started at beta = 0, not -3
pretrain_iters = 1000           # train.py's CPU default
finetune_iters = 200
learning_rate = 3e-4            # a fine-tune's rate: about a sixth of the pretraining peak
eval_iters = 20                 # val batches of 8 x 256 tokens per loss, train.py's CPU default
seed = 1337
FLAGS = flags_of(globals())


def pretrain(cfg):
    """The tiny GPT-2: train.py with GPT-2's positions and GELU, saved once in the Hugging Face layout."""
    run, folder = os.path.join(cfg.out_dir, 'run'), os.path.join(cfg.out_dir, 'hf')
    if not finished(run):
        run_train(run, ['--positions=learned', '--gelu=tanh', f'--max_iters={cfg.pretrain_iters}', f'--seed={cfg.seed}',
                        f'--warmup_iters={min(20, cfg.pretrain_iters // 10)}',  # train.py's 20; less for a quick try
                        '--device=cpu'] + ([f'--data_dir={cfg.data_dir}'] if cfg.data_dir else []))
    model, _ = load_model(os.path.join(run, 'ckpt.pt'))
    gpt2.save_pretrained(model, folder)
    return folder


def main(argv):
    cfg, _ = configure(argv, FLAGS, __doc__)
    torch.manual_seed(cfg.seed)
    folder = pretrain(cfg)
    data_dir = cfg.data_dir or os.path.join(ROOT, 'data', 'python_stdlib')
    batches = types.SimpleNamespace(data_dir=data_dir, batch_size=8, block_size=256, eval_iters=cfg.eval_iters,
                                    seed=cfg.seed)
    rows = []
    for name in cfg.attentions.split(','):
        attention, init_options = ('infini', {'gate_logit': 0.0}) if name == 'infini0' else (name, {})
        checkpoint = gpt2.gpt2_checkpoint(folder, init_options=init_options, attention=attention)
        model = gpt2.GPT(gpt2.GPTConfig(**checkpoint['model_args']))
        model.load_state_dict(checkpoint['model'])
        before = estimate_loss(batches, model, nullcontext(), 'cpu', {})['val']
        optimizer = model.configure_optimizers(0.1, cfg.learning_rate, (0.9, 0.99), 'cpu')
        for it in range(cfg.finetune_iters):
            x, y = get_batch(data_dir, 'train', 8, 256, np.random.default_rng([cfg.seed, 2, it]), 'cpu')
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = estimate_loss(batches, model, nullcontext(), 'cpu', {})['val']
        stats = attention_stats(model, x)  # what each attention reports about itself (runs.py)
        extra = ' '.join(f'{k[3:]}={v:.2f}' for k, v in stats.items() if k.startswith('L0.'))  # layer 0
        rows.append(f'| {name} | {before:.3f} | {after:.3f} | {extra} |')
        print(rows[-1], flush=True)
    table = '\n'.join([f'| attention | val loss from the tiny GPT-2 | after {cfg.finetune_iters} steps | layer 0 |',
                       '|---|---|---|---|', *rows])
    print(table)
    with open(os.path.join(cfg.out_dir, 'results.md'), 'w') as f:
        f.write(table + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
