"""
Language modelling on the default data (byte-level Python stdlib) at the default CPU settings: the causal baseline,
Selective Attention and InAttention, each with the position schemes it takes (docs/selective.md, docs/inattention.md).

  python experiments/selective_lm.py                                          # every run, seed 1337
  python experiments/selective_lm.py --runs=causal-rope,selective-rope --seeds=1337,1,2
  python experiments/selective_lm.py --train=False --runs=all --seeds=1337,1,2   # tables of what is trained
  python experiments/selective_lm.py --runs=causal-rope --seeds=1337 --lrs=1e-3,2e-3,4e-3   # a learning-rate sweep
  python experiments/selective_lm.py --runs=causal-rope,selective-rope --extra=--max_iters=3000   # train longer

A run is <attention>-<positions>; it is `python train.py --attention=A --positions=P --seed=S` with train.py's
defaults otherwise (on a CPU: 4 layers x 4 heads x 128 wide, block 256, batch 8, 1000 iterations, lr 2e-3).
causal2x-rope is causal with 8 heads of 32 (train.py --n_head=8 --head_size=32): twice the heads and attention weights;
causal4x-rope has 16 heads of 32, four times; causal6l-rope has 6 layers instead of 4 (1.5x the whole model).
Runs are trained once (out_dir/<run>-s<seed>[-lr<lr>][-<extra>]/ckpt.pt is reused; a stopped run resumes) and one
at a time; set OMP_NUM_THREADS to the cores you give them. The val loss of a run is train.py's own estimate at each
eval (the same 20 batches of 8 x 256 tokens for every run), read from its log.csv (runs.py). Tables (final val
loss, mean and spread over seeds; the curve of seed means) are printed and written to out_dir/results.md.
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure, flags_of  # noqa: E402
from experiments.common import finished, run_train  # noqa: E402
from runs import read_log  # noqa: E402

RUNS = ('causal-learned', 'causal-rope', 'causal-alibi', 'selective-learned', 'selective-rope', 'selective-alibi',
        'in-learned', 'in-alibi', 'causal2x-rope', 'causal4x-rope', 'causal6l-rope')
# causal2x: the paper's "2x heads and attention parameters" baseline (its abstract): 8 heads of 32 in the 128-wide
# model instead of 4, so the attention's weights double and the rest of the model stays as it is. causal4x: 16 heads
# of 32, four times the attention's weights, to find the causal size that selective matches. causal6l: deeper
# instead of wider, 6 layers of 4 heads (the MLPs grow too).
BIGGER = {'causal2x': ['--attention=causal', '--n_head=8', '--head_size=32'],
          'causal4x': ['--attention=causal', '--n_head=16', '--head_size=32'],
          'causal6l': ['--attention=causal', '--n_layer=6']}

runs = 'all'                # comma-separated names from RUNS, or 'all'
seeds = '1337'              # comma-separated
lrs = ''                    # comma-separated learning rates; '' = train.py's default
extra = ''                  # more train.py flags for every run, space-separated (e.g. '--max_iters=2000')
out_dir = 'out-selective-lm'
train = True                # False: only read the logs of runs already trained
FLAGS = flags_of(globals())


def run_dir(settings, run, seed, lr):
    """out_dir/<run>-s<seed>[-lr<lr>][-<extra flags>], e.g. causal-rope-s1-max_iters3000."""
    extra = ''.join('-' + flag.lstrip('-').replace('=', '') for flag in settings.extra.split())
    return os.path.join(settings.out_dir, f'{run}-s{seed}' + (f'-lr{lr}' if lr else '') + extra)


def val_curve(settings, run, seed, lr):
    """Train one run unless it has finished; return {step: val loss} read from its log.csv (None when the run has
    not finished)."""
    folder = run_dir(settings, run, seed, lr)
    if not finished(folder) and settings.train:
        attention, positions = run.split('-')
        model = BIGGER.get(attention, [f'--attention={attention}'])
        flags = [*model, f'--positions={positions}', f'--seed={seed}'] + ([f'--learning_rate={lr}'] if lr else [])
        run_train(folder, flags + settings.extra.split())
    if not finished(folder):
        return None
    return {int(r['iter']): r['val_loss'] for r in read_log(folder) if r['val_loss'] is not None}


def main(argv):
    settings, _ = configure(argv, FLAGS, __doc__)
    names = RUNS if settings.runs == 'all' else tuple(settings.runs.split(','))
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {', '.join(unknown)}; choose from: {', '.join(RUNS)}")
    seed_list = [int(s) for s in str(settings.seeds).split(',')]
    lr_list = [x for x in str(settings.lrs).split(',') if x] or ['']
    curves = {}
    for seed in seed_list:  # all runs of one seed before the next: a stopped sweep still compares every run
        for run in names:
            for lr in lr_list:
                curve = val_curve(settings, run, seed, lr)
                if curve:
                    curves[run, lr, seed] = curve
    lines = ['| run | lr | seeds | final val loss: mean | spread (min..max) | each seed |',
             '|---|---|---:|---:|---|---|']
    for run in names:
        for lr in lr_list:
            finals = [(s, curves[run, lr, s][max(curves[run, lr, s])]) for s in seed_list if (run, lr, s) in curves]
            if not finals:
                lines.append(f'| {run} | {lr or "default"} | 0 | not measured yet | | |')
                continue
            values = np.array([v for _, v in finals])
            lines.append(f'| {run} | {lr or "default"} | {len(values)} | {values.mean():.3f} | '
                         f'{values.min():.3f}..{values.max():.3f} | '
                         + ', '.join(f'{s}: {v:.3f}' for s, v in finals) + ' |')
    steps = sorted({step for c in curves.values() for step in c})
    lines += ['', 'val loss by step (mean over the seeds run):', '',
              '| run | lr | ' + ' | '.join(str(s) for s in steps) + ' |', '|---|---|' + '---:|' * len(steps)]
    for run in names:
        for lr in lr_list:
            cs = [curves[run, lr, s] for s in seed_list if (run, lr, s) in curves]
            if cs:
                cells = [f'{np.mean([c[s] for c in cs if s in c]):.3f}' if any(s in c for c in cs) else ''
                         for s in steps]
                lines.append(f'| {run} | {lr or "default"} | ' + ' | '.join(cells) + ' |')
    text = '\n'.join(lines)
    print(text)
    os.makedirs(settings.out_dir, exist_ok=True)
    with open(os.path.join(settings.out_dir, 'results.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
