"""
Selective Attention on its synthetic tasks (docs/selective.md): Variable Assignment, where a new assignment should
mask the old one, with Parity and Copy as controls. Selective against causal at equal size, the same positions.

  python experiments/selective_synthetic.py                                   # varassign, causal and selective
  python experiments/selective_synthetic.py --seeds=1337,1,2
  python experiments/selective_synthetic.py --task=parity
  python experiments/selective_synthetic.py --task=copy
  python experiments/selective_synthetic.py --train=False                     # score what is trained

Training follows a curriculum from short examples to long: one dataset per stage, of the stage's length in tokens
(--stages), each example holding from 2 up to as many assignments (or bits) as fit. Each stage fine-tunes the
previous one's checkpoint (train.py --init_from) for --iters iterations, with the loss on the answer only
(meta.pkl's answer_len) and --batch_tokens tokens per batch. Short examples first: with 2 or 3 assignments the
answer is one of few digits, so the lookup has a strong signal. Copy has one stage at the last length (data/copy,
loss on every token), trained as many iterations as the whole curriculum. Runs are trained once and one at a
time (out_dir/<task>/<model>-s<seed>[-<flags not at their default>]/stage<i>/ckpt.pt is reused); set
OMP_NUM_THREADS.

What is measured, on every example of a val set (the same for every model):
  accuracy   each stage's checkpoint on its own stage's val set: the share of answers greedy decoding gets
             exactly right (answer_accuracy); for copy, the share of letters of the repeats predicted right
             (copy_accuracy)
  unmasked   the last stage, selective only: per layer, how many of the prompt's tokens the question token still
             sees, a token counting as masked once its F reaches 1 (unmasked_tokens; the auxiliary memory loss's
             count with tau = 1)
"""
import os
import re
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoints import load_model  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from data.common import load_meta  # noqa: E402
from tools.evaluate import answer_scores  # noqa: E402
from experiments.common import finished, prepare, run_train  # noqa: E402

TASKS = ('varassign', 'parity', 'copy')

task = 'varassign'
stages = '16,32,64'         # curriculum: the example length (tokens, prompt + answer) of each stage
n_vars = 8                  # varassign: variable names
models = 'causal,selective'  # attention names; causal<k>x is causal with k times the heads, each as wide
positions = 'rope'
seeds = '1337'
iters = 4000                # training iterations per stage
n_layer = 3
n_head = 4
n_embd = 64
batch_tokens = 2048         # tokens per batch: 128 examples of 16 tokens, 32 of 64
learning_rate = 3e-3
extra = ''                  # more train.py flags for every run, space-separated
out_dir = 'out-selective-synthetic'
train = True                # False: only score the runs already trained
FLAGS = flags_of(globals())
TRAINING = ('stages', 'iters', 'n_layer', 'n_head', 'n_embd', 'batch_tokens', 'learning_rate', 'positions')


# ---------------------------------------------------------------------------------------------------------
# Scoring.

def answer_accuracy(model, examples, answer_len, batch_size=64):
    """The share of examples (n, T) whose last answer_len tokens greedy decoding gets exactly right, scored
    batch_size examples at a time by evaluate.answer_scores (one teacher-forced forward each)."""
    correct = []
    for i in range(0, len(examples), batch_size):
        x = examples[i:i + batch_size]
        right, _ = answer_scores(model, x[:, :-answer_len], x[:, -answer_len:])
        correct.append(right.all(-1))
    return torch.cat(correct).float().mean().item()


def last_value_accuracy(examples):
    """varassign: the share of examples (n, T) whose answer is the last digit assigned, whatever the variable asked.
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
    """Per layer, the mean over prompts (n, T) of the tokens the last prompt token still sees: those with
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
    """out_dir/<task>, or out_dir/varassign-vars<n> for other than 8 names: other settings never mix."""
    suffix = f'-vars{settings.n_vars}' if settings.task == 'varassign' and settings.n_vars != 8 else ''
    return os.path.join(settings.out_dir, settings.task + suffix)


def changed(settings):
    """'-<flag><value>' for each training flag not at its default, e.g. '-stages16-iters12000': a run (and its
    results file) with other settings never reuses another's."""
    flags = ''.join(f'-{k}{getattr(settings, k)}' for k in TRAINING if getattr(settings, k) != FLAGS[k])
    flags += ''.join('-' + flag.lstrip('-').replace('=', '') for flag in settings.extra.split())
    return flags.replace(',', '_')


def run_dir(settings, name, seed):
    """task_dir/<model>-s<seed>[-<training flags not at their default>], e.g. causal-s1-stages16-iters12000."""
    return os.path.join(task_dir(settings), f'{name}-s{seed}' + changed(settings))


def stage_data(settings, stage, length):
    """Prepare (once) the dataset of one curriculum stage, examples of `length` tokens; return its folder."""
    flags = [f'--length={length}']
    if settings.task == 'varassign':
        flags += ['--min_assign=2', f'--n_vars={settings.n_vars}', '--n_train=200000']
    elif settings.task == 'parity':
        flags += ['--min_bits=2']
    return prepare(settings.task, os.path.join(task_dir(settings), 'data', f'stage{stage}-len{length}'), flags)


def model_flags(settings, name):
    """train.py flags of a model name: an attention name, or causal<k>x, causal with k times the heads at the same
    head width (k times the attention's weights), the paper's "2x heads" baseline (its abstract)."""
    wide = re.fullmatch(r'causal(\d+)x', name)
    if wide:
        return ['--attention=causal', f'--n_head={int(wide[1]) * settings.n_head}',
                f'--head_size={settings.n_embd // settings.n_head}']
    return [f'--attention={name}', f'--n_head={settings.n_head}']


def train_stages(settings, name, seed, folders, iters):
    """Train one model through the curriculum's stages; return the checkpoint paths of the stages trained."""
    previous, ckpts = None, []
    for stage, data in enumerate(folders):
        folder = os.path.join(run_dir(settings, name, seed), f'stage{stage}')
        if not finished(folder):
            if not settings.train:
                return ckpts
            length = load_meta(data)['example_len']
            flags = [f'--data_dir={data}', f'--positions={settings.positions}', f'--seed={seed}',
                     f'--block_size={length}', f'--max_iters={iters}',
                     f'--eval_interval={max(1, iters // 8)}', '--eval_iters=10',
                     f'--warmup_iters={min(50, iters // 10)}',  # 50 for a real run; shorter for a quick try
                     f'--learning_rate={settings.learning_rate}',
                     f'--batch_size={max(1, settings.batch_tokens // length)}', '--weight_decay=0']
            flags += ([*model_flags(settings, name), f'--n_layer={settings.n_layer}', f'--n_embd={settings.n_embd}']
                      if previous is None else [])
            run_train(folder, flags + settings.extra.split(), init_from=previous)
        previous = os.path.join(folder, 'ckpt.pt')
        ckpts.append(previous)
    return ckpts


def score_run(settings, ckpt, data):
    """(accuracy, unmasked tokens per layer, prompt length) of one checkpoint on its stage's val set."""
    model, _ = load_model(ckpt, 'cpu')
    model.eval()
    example_len = load_meta(data)['example_len']
    examples = torch.from_numpy(np.fromfile(os.path.join(data, 'val.bin'), dtype=np.uint16).astype(np.int64))
    examples = examples.view(-1, example_len)
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
    try:
        lengths = [int(n) for n in str(settings.stages).split(',')]
    except ValueError:
        raise SystemExit(f"--stages='{settings.stages}' must be example lengths, e.g. 16,32,64") from None
    iters = settings.iters
    if settings.task == 'copy':  # one stage at the last length, as many iterations as the whole curriculum
        folders, iters = [stage_data(settings, 0, lengths[-1])], settings.iters * len(lengths)
    else:
        folders = [stage_data(settings, i, n) for i, n in enumerate(lengths)]
    names = settings.models.split(',')
    seed_list = [int(s) for s in str(settings.seeds).split(',')]
    results = {}
    for seed in seed_list:
        for name in names:
            # each stage's checkpoint on its own stage's val set: how far along the curriculum the lookup holds
            ckpts = train_stages(settings, name, seed, folders, iters)
            results[name, seed] = [score_run(settings, c, d) for c, d in zip(ckpts, folders)]
    about = f', {settings.n_vars} variable names' if settings.task == 'varassign' else ''
    shown = [load_meta(d)['example_len'] for d in folders]
    lines = [f'{settings.task}{about}, stages of {",".join(map(str, shown))} tokens per example, {iters} iterations '
             f'each; {settings.n_layer} layers x {settings.n_head} heads x {settings.n_embd}, {settings.positions} '
             'positions. Accuracy: mean over seeds (min..max), each stage on its own val set.', '',
             '| model | seeds | ' + ' | '.join(f'accuracy at {n}' for n in shown)
             + ' | unmasked tokens per layer, last stage (of the prompt) |',
             '|---|---:|' + '---:|' * len(shown) + '---|']
    for name in names:
        got = [results[name, s] for s in seed_list if results.get((name, s))]
        row = f'| {name} | {len(got)} |'
        for stage in range(len(shown)):
            acc = np.array([r[stage][0] for r in got if len(r) > stage])
            row += f' {acc.mean():.1%} ({acc.min():.0%}..{acc.max():.0%}) |' if len(acc) else ' not measured yet |'
        last = [r[-1] for r in got if len(r) == len(shown)]
        unmasked = ', '.join(f'{u:.1f}' for u in np.mean([u for _, u, _ in last], axis=0)) if last else ''
        lines.append(row + (f' {unmasked} (of {last[0][2]}) |' if last else ' |'))
    if settings.task == 'varassign':
        row = '| copy the last digit assigned (no lookup) | |'
        for data, n in zip(folders, shown):
            examples = np.fromfile(os.path.join(data, 'val.bin'), dtype=np.uint16).reshape(-1, n)
            row += f' {last_value_accuracy(torch.from_numpy(examples.astype(np.int64))):.1%} |'
        lines.append(row + ' |')
    text = '\n'.join(lines)
    print(text)
    with open(os.path.join(task_dir(settings), f'results{changed(settings)}.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
