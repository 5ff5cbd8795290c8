"""
Selective Attention on its synthetic tasks (docs/selective.md): Variable Assignment, where a new assignment should
mask the old one, with Parity and Copy as controls. Selective against causal at equal size, the same positions.

  python experiments/selective_synthetic.py                                   # varassign, causal and selective
  python experiments/selective_synthetic.py --seeds=1337,1,2
  python experiments/selective_synthetic.py --queries=0.5 --seeds=1337,1,2    # many questions per example
  python experiments/selective_synthetic.py --task=parity --stages=4,12,0
  python experiments/selective_synthetic.py --train=False                     # score what is trained

Training follows a curriculum: one dataset per stage, from few assignments (or bits) to many, all of --length
tokens; each stage fine-tunes the previous one's checkpoint (train.py --init_from) for --iters iterations, with the
loss on the answer only (meta.pkl's answer_len). With --queries, varassign examples also hold questions answered
in place and the loss counts every token: many lookups per example instead of one. Copy has one stage (data/copy,
loss on every token). Runs are trained once (out_dir/<task>[-queries<q>]/<model>-s<seed>/stage<i>/ckpt.pt is
reused) and one at a time; set OMP_NUM_THREADS.

What is measured on the last stage's val set (every example of it, the same for every model):
  accuracy   the share of answers greedy decoding gets exactly right (answer_accuracy); for copy, the share of
             letters of the repeats predicted right (copy_accuracy)
  unmasked   selective only: per layer, how many of the prompt's tokens the question token still sees, a token
             counting as masked once its F reaches 1 (unmasked_tokens; the auxiliary memory loss's count with tau = 1)
"""
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure, flags_of, load_model  # noqa: E402
from data.common import load_meta  # noqa: E402

TASKS = ('varassign', 'parity', 'copy')

task = 'varassign'
length = 64                 # tokens per example (prompt + answer)
stages = '2,6,0'            # curriculum: the most assignments (bits) of each stage; 0 = as many as fit
n_vars = 4                  # varassign: variable names
queries = 0.0               # varassign: the share of items that are questions answered in place (loss on every token)
models = 'causal,selective'
positions = 'rope'
seeds = '1337'
iters = 2000                # training iterations per stage
n_layer = 3
n_head = 4
n_embd = 64
batch_size = 32
learning_rate = 3e-3
extra = ''                  # more train.py flags for every run, space-separated
out_dir = 'out-selective-synthetic'
train = True                # False: only score the runs already trained
FLAGS = flags_of(globals())


# ---------------------------------------------------------------------------------------------------------
# Scoring.

@torch.no_grad()
def answer_accuracy(model, examples, answer_len, batch_size=64):
    """The share of examples (N, L) whose last answer_len tokens greedy decoding gets exactly right. One forward
    gives what greedy decoding would: an answer is exactly right when the argmax at each of its positions, the
    right earlier tokens given, is the right token."""
    correct = []
    for i in range(0, len(examples), batch_size):
        x = examples[i:i + batch_size]
        logits, _ = model(x[:, :-1], x[:, 1:])  # with targets, the logits of every position
        correct.append((logits[:, -answer_len:].argmax(-1) == x[:, -answer_len:]).all(-1))
    return torch.cat(correct).float().mean().item()


def last_value_accuracy(examples):
    """varassign: the share of examples (N, L) whose answer is the last digit assigned, whatever the variable asked.
    A model that has not learned the lookup can reach this by copying that digit."""
    hits = [bytes(row).decode().split()[-2][-1] == bytes(row).decode()[-1] for row in examples.to(torch.uint8).numpy()]
    return float(np.mean(hits))


@torch.no_grad()
def copy_accuracy(model, examples, batch_size=64):
    """data/copy: the share of letters after the first period (the repeats) whose argmax prediction is right.
    The period of each example is the smallest shift under which it repeats."""
    hits = total = 0
    for i in range(0, len(examples), batch_size):
        x = examples[i:i + batch_size]
        logits, _ = model(x[:, :-1], x[:, 1:])
        right = logits.argmax(-1) == x[:, 1:]  # right[:, t]: token t+1 predicted
        for row, seq in enumerate(x.tolist()):
            period = next(p for p in range(1, len(seq)) if seq[p:] == seq[:-p])
            hits += right[row, period - 1:].sum().item()
            total += len(seq) - period
    return hits / total


@torch.no_grad()
def unmasked_tokens(model, prompts, tau=1.0):
    """Per layer, the mean over prompts (N, T) of the tokens the last prompt token still sees: those with
    F < tau at that query (every token, for an attention without selection)."""
    blocks = model.transformer.h
    if model.config.attention != 'selective':
        return [float(prompts.size(1))] * len(blocks)
    inputs = {}
    hooks = [block.attn.register_forward_pre_hook(lambda m, args, layer=layer: inputs.__setitem__(layer, args[0]))
             for layer, block in enumerate(blocks)]
    try:
        model(prompts)
    finally:
        for hook in hooks:
            hook.remove()
    return [(block.attn.selection_masks(inputs[layer])[:, -1] < tau).sum(-1).float().mean().item()
            for layer, block in enumerate(blocks)]


# ---------------------------------------------------------------------------------------------------------
# The runs.

def task_dir(settings):
    """out_dir/<task>, or out_dir/varassign-queries<q>: data and runs of another setting never mix."""
    queries = f'-queries{settings.queries:g}' if settings.task == 'varassign' and settings.queries else ''
    return os.path.join(settings.out_dir, settings.task + queries)


def stage_data(settings, stage, most):
    """Prepare (once) the dataset of one curriculum stage; return its folder."""
    folder = os.path.join(task_dir(settings), 'data', f'stage{stage}')
    if os.path.isfile(os.path.join(folder, 'meta.pkl')):
        return folder
    script = os.path.join(ROOT, 'data', settings.task, 'prepare.py')
    cmd = [sys.executable, script, f'--length={settings.length}', f'--out_dir={folder}']
    if settings.task == 'varassign':
        cmd += [f'--max_assign={most}', f'--n_vars={settings.n_vars}', f'--queries={settings.queries}']
    elif settings.task == 'parity':
        cmd += [f'--max_bits={most}']
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f'preparing {folder} failed (see above)')
    return folder


def train_run(settings, name, seed, folders):
    """Train one model through the curriculum's stages; return the last stage's checkpoint path (or None)."""
    previous = None
    for stage, data in enumerate(folders):
        folder = os.path.join(task_dir(settings), f'{name}-s{seed}', f'stage{stage}')
        ckpt = os.path.join(folder, 'ckpt.pt')
        if not os.path.isfile(ckpt):
            if not settings.train:
                return None
            cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--data_dir={data}', f'--out_dir={folder}',
                   f'--attention={name}', f'--positions={settings.positions}', f'--seed={seed}',
                   f'--block_size={settings.length}', f'--max_iters={settings.iters}',
                   f'--eval_interval={max(1, settings.iters // 4)}', '--eval_iters=10', '--warmup_iters=50',
                   f'--learning_rate={settings.learning_rate}', f'--batch_size={settings.batch_size}',
                   '--weight_decay=0']
            cmd += ([f'--n_layer={settings.n_layer}', f'--n_head={settings.n_head}', f'--n_embd={settings.n_embd}']
                    if previous is None else [f'--init_from={previous}'])
            cmd += settings.extra.split()
            print(' '.join(cmd[1:]), flush=True)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, 'train.log'), 'w') as f:
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode != 0:
                    raise SystemExit(f'{name} seed {seed} stage {stage} failed: see {folder}/train.log')
        previous = ckpt
    return previous


def score(settings, ckpt, data):
    model, _ = load_model(ckpt, 'cpu')
    model.eval()
    L = load_meta(data)['example_len']
    examples = torch.from_numpy(np.fromfile(os.path.join(data, 'val.bin'), dtype=np.uint16).astype(np.int64))
    examples = examples.view(-1, L)
    if settings.task != 'copy':  # the final question's one-digit answer (the loss may have counted more)
        accuracy = answer_accuracy(model, examples, 1)
    else:
        accuracy = copy_accuracy(model, examples)
    prompts = examples[:, :-1]
    return accuracy, unmasked_tokens(model, prompts), prompts.size(1)


def main(argv):
    settings, _ = configure(argv, FLAGS, __doc__)
    if settings.task not in TASKS:
        raise SystemExit(f"unknown --task '{settings.task}', choose one of: {', '.join(TASKS)}")
    if settings.task == 'copy':
        folder = os.path.join(task_dir(settings), 'data', 'stage0')
        if not os.path.isfile(os.path.join(folder, 'meta.pkl')):
            subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'copy', 'prepare.py'),
                            f'--length={settings.length}', f'--out_dir={folder}'], cwd=ROOT, check=True)
        folders = [folder]
    else:
        folders = [stage_data(settings, i, int(most)) for i, most in enumerate(str(settings.stages).split(','))]
    names = settings.models.split(',')
    seed_list = [int(s) for s in str(settings.seeds).split(',')]
    results = {}
    for seed in seed_list:
        for name in names:
            ckpt = train_run(settings, name, seed, folders)
            if ckpt:
                results[name, seed] = score(settings, ckpt, folders[-1])
    queries = f', {settings.queries:g} of items questions in place' if '-queries' in task_dir(settings) else ''
    lines = [f'{settings.task}{queries}, {settings.length}-token examples, stages {settings.stages}, {settings.iters} '
             f'iterations each; {settings.n_layer} layers x {settings.n_head} heads x {settings.n_embd}, '
             f'{settings.positions} positions', '',
             '| model | seeds | accuracy: mean | spread (min..max) | unmasked tokens per layer (of the prompt) |',
             '|---|---:|---:|---|---|']
    for name in names:
        got = [results[name, s] for s in seed_list if (name, s) in results]
        if not got:
            lines.append(f'| {name} | 0 | not measured yet | | |')
            continue
        acc = np.array([a for a, _, _ in got])
        unmasked = np.mean([u for _, u, _ in got], axis=0)
        lines.append(f'| {name} | {len(got)} | {acc.mean():.1%} | {acc.min():.1%}..{acc.max():.1%} | '
                     + ', '.join(f'{u:.1f}' for u in unmasked) + f' (of {got[0][2]}) |')
    if settings.task == 'varassign':
        examples = np.fromfile(os.path.join(folders[-1], 'val.bin'), dtype=np.uint16).reshape(-1, settings.length)
        lines.append(f'| copy the last digit assigned (no lookup) | | '
                     f'{last_value_accuracy(torch.from_numpy(examples.astype(np.int64))):.1%} | | |')
    text = '\n'.join(lines)
    print(text)
    with open(os.path.join(task_dir(settings), 'results.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
