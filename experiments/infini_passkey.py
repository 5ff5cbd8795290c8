"""
Does Infini-attention's compressive memory retrieve a passkey past the training length? (docs/infini.md)

Trains small models on 256-token passkey examples, then tests them on longer prompts, with the memory read on
and switched off, and measures how the memory's read weight spreads as prompts grow:

  python experiments/infini_passkey.py --runs=paper --seeds=1                   # the paper's mechanism
  python experiments/infini_passkey.py --runs=sharp_boost@9000 --seeds=1,2      # two changes, 9,000 iterations
  python experiments/infini_passkey.py --runs=local,causal --seeds=1            # the controls
  python experiments/infini_passkey.py --runs=paper_then_sharp_boost63@3000 --seeds=1,2,3   # paper, then both
  python experiments/infini_passkey.py --train=False --runs=paper,sharp_boost@9000,causal --seeds=1,2   # tables

docs/infini.md has the commands behind its numbers and reads them.

Each run trains once (out_dir/<run>-<iterations>-s<seed>/ckpt.pt is reused; a stopped run resumes) and is evaluated once
(eval.json beside the checkpoint is reused while the evaluation flags stay the same). The tables are printed
and written to out_dir/results.md. One training process at a time; set OMP_NUM_THREADS to the cores you give it.

What is measured, per checkpoint and prompt length (lengths x depths x trials examples, the same for every model):
  accuracy     the share of examples whose 5 digits greedy decoding gets exactly right
  digit loss   the mean cross-entropy of the 5 digits (ln 10 = 2.30 is a uniform guess)
  needle share per head: the share of its memory-read weight sigma(q).sigma(k_j) (eq. 3) that falls on the
               passkey sentence, at the last prompt token (attention_infini.memory_weights)
The memory-read ablations (GPTConfig.memory_read: 'off' = A_mem = 0, 'local' = gate 0) use the same weights.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from attention_infini import gate_values, memory_weights, sigma  # noqa: E402
from checkpoints import load_checkpoint, load_model  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from data.common import ByteTokenizer  # noqa: E402
from data.passkey.task import NEEDLE, make_passkey  # noqa: E402
from model import cross_entropy  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out-infini-passkey'   # data, checkpoints, evaluations and results.md go here (gitignored: out*/)
runs = 'paper,sharp_boost'      # comma-separated names of RUNS below; name@iterations trains that run longer
seeds = '1'                     # comma-separated training seeds
train = True                    # train the runs that have no finished checkpoint
evaluate = True                 # evaluate every finished checkpoint of the runs and seeds, print the tables
max_iters = 6000                # training iterations of a run named without @iterations
lengths = '256,1024,2048,4096'  # prompt lengths to test (256 = the training length)
depths = '0,0.25,0.5,0.75,1'    # where the passkey sits, as a fraction of the filler
trials = 20                     # examples per (length, depth)
batch_size = 20                 # examples per forward in the evaluation
seed = 1337                     # the evaluation's examples
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------

# the model and schedule every run shares: 2 layers, 4 heads, 64 wide, segments of 64, delta rule
COMMON = ['--dataset=passkey', '--n_layer=2', '--n_head=4', '--n_embd=64', '--block_size=256', '--segment_len=64',
          '--memory_update=delta', '--batch_size=16', '--learning_rate=2e-3', '--eval_interval=1000',
          '--eval_iters=10', '--device=cpu', '--dtype=float32', '--compile=False']
RUNS = {  # name: (train.py flags, what it is)
    'paper': (['--attention=infini'], "the paper's mechanism: sigma = ELU + 1, no boost"),
    'sharp': (['--attention=infini', '--feature_scale=4'], 'sigma(x) = ELU(4x) + 1 alone'),
    'boost': (['--attention=infini', '--memory_boost=15'], "the first write counts 1 + U(0, 15) times alone"),
    'sharp_boost': (['--attention=infini', '--feature_scale=4', '--memory_boost=15'], 'both changes'),
    'sharp_boost63': (['--attention=infini', '--feature_scale=4', '--memory_boost=63'],
                      'both changes, the first write counts up to 64 times (a 4k prompt holds 63 segments)'),
    'local': (['--attention=infini', '--memory_read=local'], 'control: infini trained with the memory read off '
              '(gate 0), local attention inside each segment only'),
    'causal': (['--attention=causal', '--positions=learned'],
               'control: causal attention over the whole 256-token context'),
    'paper_then_sharp_boost63': (['--feature_scale=4', '--memory_boost=63'],
                                 "two stages: the paper's mechanism (the paper run, --max_iters iterations), then "
                                 "fine-tuned with both changes (boost 63) for the run's own iterations"),
    'paper_then_sharp': (['--feature_scale=4'], 'two stages, the second with sigma(x) = ELU(4x) + 1 alone'),
    'paper_then_boost63': (['--memory_boost=63'], 'two stages, the second with the boost (63) alone'),
    'paper_then_more': ([], 'two stages, the second with neither change: the control for the extra training'),
}
# runs that fine-tune another run's final checkpoint (train.py --init_from): the paper's mechanism trains first,
# which is fast, and the sharper, crowded memory is taught after (docs/infini.md, "Two stages")
BASE = {name: 'paper' for name in RUNS if name.startswith('paper_then_')}
DATA_LENGTH = 256  # the training examples' length


def parse_list(flag, text, kind):
    try:
        values = [kind(x) for x in text.split(',') if x]
    except ValueError:
        raise SystemExit(f'--{flag}={text}: expected comma-separated {kind.__name__}s') from None
    if not values:
        raise SystemExit(f'--{flag} is empty')
    return values


# -----------------------------------------------------------------------------------------------------------
# Training: train.py in a subprocess, one run at a time.

def finished(ckpt_path, iters):
    return os.path.isfile(ckpt_path) and load_checkpoint(ckpt_path).get('iter_num', 0) >= iters


def prepare_data(folder):
    if not os.path.isfile(os.path.join(folder, 'val.bin')):
        subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'passkey', 'prepare.py'), f'--length={DATA_LENGTH}',
                        '--n_train=20000', '--n_val=200', f'--out_dir={folder}'], check=True, cwd=ROOT)


def train_run(run_dir, flags, run_seed, iters, data_dir, base=None):
    """Train (or resume) one run; base: the checkpoint a fine-tuning run starts from."""
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if finished(ckpt_path, iters):
        return
    os.makedirs(run_dir, exist_ok=True)
    start_from = ['--init_from=resume'] if os.path.isfile(ckpt_path) else [f'--init_from={base}'] if base else []
    cmd = [sys.executable, 'train.py', *COMMON, *flags, f'--data_dir={data_dir}', f'--seed={run_seed}',
           f'--max_iters={iters}', f'--out_dir={run_dir}', *start_from]
    print(' '.join(cmd[1:]), flush=True)
    with open(os.path.join(run_dir, 'train.log'), 'a') as log:  # the printout; log.csv has the numbers and time
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f'training failed, see {run_dir}/train.log')


# -----------------------------------------------------------------------------------------------------------
# Evaluation

def examples(length, depth_list, trials, run_seed):
    """trials examples per depth: (prompt ids, answer ids, needle start, needle length), the same for every model."""
    tok = ByteTokenizer()
    needle_head = tok.encode(NEEDLE.split('{key}')[0])  # '\nThe pass key is ': only the needle starts so
    out = []
    for depth in depth_list:
        rng = np.random.default_rng([run_seed, length, int(depth * 1000)])
        for _ in range(trials):
            prompt, answer = make_passkey(length, depth, rng, tok)
            start = next(i for i in range(len(prompt)) if prompt[i:i + len(needle_head)] == needle_head)
            needle_len = len(tok.encode(NEEDLE.format(key=tok.decode(answer))))
            out.append((prompt, answer, start, needle_len))
    return out


@torch.no_grad()
def score(model, batch, **options):
    """Accuracy and digit loss of a batch of same-length examples, in one forward over prompt + answer.

    Greedy decoding gets all 5 digits right exactly when each digit is the most likely token given the prompt and
    the right digits before it (by induction over the digits), so one teacher-forced forward decides it. The
    streaming cache gives the same logits as this forward (tests/test_infini.py). options go to the forward."""
    ids = torch.tensor([p + a for p, a, _, _ in batch])
    n_answer = len(batch[0][1])
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[:, :-n_answer] = -1  # only the digits are targets
    logits, _ = model(x, y, **options)
    digits = logits[:, -n_answer:]
    correct = (digits.argmax(-1) == y[:, -n_answer:]).all(-1)
    losses = cross_entropy(digits, y[:, -n_answer:], reduction='none').view(len(batch), n_answer).mean(-1)
    return correct.tolist(), losses.tolist()


@torch.no_grad()
def needle_shares(model, batch):
    """Per example and (layer, head): the share of the memory read's weight on the needle, at the last prompt
    token (the query that predicts the first digit). None where the needle is not all in the memory yet."""
    config = model.config
    N, H, C = config.segment_len, config.n_head, config.n_embd
    captured = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, i, o: captured.append(o))
             for block in model.transformer.h]
    ids = torch.tensor([p for p, _, _, _ in batch])
    model(ids)
    for hook in hooks:
        hook.remove()
    query = ids.size(1) - 1
    stored = query // N * N  # the complete segments before the query's segment are in the memory
    shares = torch.full((len(batch), config.n_layer, H), float('nan'))
    for layer, qkv in enumerate(captured):
        q, k, _ = qkv.split(C, dim=2)
        q = q[:, query].view(-1, H, 1, C // H)
        k = k[:, :stored].view(-1, stored, H, C // H).transpose(1, 2)
        w = memory_weights(sigma(q, config.feature_scale), sigma(k, config.feature_scale))[:, :, 0]  # (B, H, stored)
        for i, (_, _, start, n) in enumerate(batch):
            if start + n <= stored:
                shares[i, layer] = w[i, :, start:start + n].sum(-1)
    return shares, stored


def evaluate_checkpoint(ckpt_path, settings):
    """Accuracy, digit loss (per memory_read for infini) and needle shares by length; cached in eval.json."""
    key = {k: getattr(settings, k) for k in ('lengths', 'depths', 'trials', 'seed')}
    key['version'] = 2  # what is measured: bump when it changes, so older eval.json files are recomputed
    cache_path = os.path.join(os.path.dirname(ckpt_path), 'eval.json')
    mtime = os.path.getmtime(ckpt_path)
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            cached = json.load(f)
        if cached['key'] == key and cached['ckpt_mtime'] == mtime:
            return cached
    model, checkpoint = load_model(ckpt_path)
    infini = model.config.attention == 'infini'
    # 'on' holds each model as trained; a model trained with the memory read on is also tested without it, in
    # every layer ('off', 'local') and in one layer at a time ('off L0': layer 0's read off, the others on)
    reads = ['on']
    if infini and model.config.memory_read == 'on':
        reads += ['off', 'local'] + [f'off L{layer}' for layer in range(model.config.n_layer)]
    trained_read = model.config.memory_read if infini else None
    result = dict(key=key, ckpt_mtime=mtime, iter_num=checkpoint.get('iter_num'), scores={}, shares={})
    if infini:
        result['gates'] = gate_values(model).tolist()
    depth_list = parse_list('depths', settings.depths, float)
    for length in parse_list('lengths', settings.lengths, int):
        cases = examples(length, depth_list, settings.trials, settings.seed)
        for read in reads:
            if not model.streams and length - 1 > model.config.block_size:  # an example is `length` tokens
                continue  # a fixed-context model cannot read the prompt (cropped, the needle is often gone)
            options = {}  # the memory read of each layer, passed to this forward (attention_infini.py)
            if infini:
                options['memory_read'] = [{'on': trained_read, f'off L{layer}': 'off'}.get(
                    read, read if read in ('off', 'local') else 'on') for layer in range(model.config.n_layer)]
            correct, losses = [], []
            for i in range(0, len(cases), settings.batch_size):
                c, l_ = score(model, cases[i:i + settings.batch_size], **options)
                correct += c
                losses += l_
            result['scores'][f'{read} {length}'] = dict(accuracy=float(np.mean(correct)),
                                                        digit_loss=float(np.mean(losses)))
            print(f'  {os.path.dirname(ckpt_path)}: memory_read={read} length={length} '
                  f'accuracy={np.mean(correct):.0%} digit loss={np.mean(losses):.2f}', flush=True)
        if trained_read == 'on':
            shares, stored = [], 0
            for i in range(0, len(cases), settings.batch_size):
                s, stored = needle_shares(model, cases[i:i + settings.batch_size])
                shares.append(s)
            shares = torch.cat(shares)
            needle_len = cases[0][3]
            result['shares'][str(length)] = dict(mean=torch.nanmean(shares, dim=0).tolist(),
                                                 n=int((~shares[:, 0, 0].isnan()).sum()),
                                                 uniform=needle_len / stored)
    with open(cache_path, 'w') as f:
        json.dump(result, f, indent=1)
    return result


# -----------------------------------------------------------------------------------------------------------
# Tables

def spread(values, fmt):
    """'mean (min-max over n)' of the seeds' values, or the one value."""
    if len(values) == 1:
        return fmt(values[0])
    return f'{fmt(np.mean(values))} ({fmt(min(values))}-{fmt(max(values))}, {len(values)} seeds)'


def pct(x):
    return f'{x:.0%}'


def tables(results, length_list):
    """Markdown: accuracy by run and length, the ablation, and the needle share of the heads that retrieve."""
    head = '| run | ' + ' | '.join(f'{n} ({n // DATA_LENGTH}x)' for n in length_list) + ' |'
    rule = '|---|' + '---:|' * len(length_list)
    lines = ['Passkey accuracy (each model as trained), mean over seeds (min-max):', '', head, rule]
    for name, per_seed in results.items():
        cells = []
        for n in length_list:
            values = [r['scores'][f'on {n}']['accuracy'] for r in per_seed.values() if f'on {n}' in r['scores']]
            cells.append(spread(values, pct) if values else 'cannot (past block_size)')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')

    lines += ['', 'The ablation, accuracy / digit loss (ln 10 = 2.30 is a guess) per seed, with the memory read on, '
              'off (A_mem = 0), local (gate 0), and off in one layer only:', '',
              head.replace('| run |', '| run, seed, memory_read |'), rule]
    for name, per_seed in results.items():
        for s, r in per_seed.items():
            for read in ['on', 'off', 'local'] + [f'off L{layer}' for layer in range(len(r.get('gates', [])))]:
                if f'{read} {length_list[0]}' not in r['scores']:
                    continue
                scores = [r['scores'].get(f'{read} {n}') for n in length_list]  # None: longer than causal's block
                cells = [f"{c['accuracy']:.0%} / {c['digit_loss']:.2f}" if c else 'cannot' for c in scores]
                lines.append(f'| {name}, s{s}, {read} | ' + ' | '.join(cells) + ' |')

    lines += ['', "Needle share: of a head's memory-read weight at the last prompt token, the share on the passkey "
              "sentence; uniform: the sentence's share of the stored tokens; contrast: how many times more a needle "
              "token weighs than a filler token, share / (1 - share) * (1 - uniform) / uniform. Listed: the heads "
              "that put at least half their weight on the needle at the shortest length, with their gate "
              "sigmoid(beta).", '', head.replace('| run |', '| run, seed, layer.head (gate) |'), rule]
    uniform = None
    for name, per_seed in results.items():
        for s, r in per_seed.items():
            if not r['shares']:
                continue
            first = np.array(r['shares'][str(length_list[0])]['mean'])
            for layer, h in zip(*np.nonzero(first >= 0.5)):
                cells = []
                for n in length_list:
                    share, u = r['shares'][str(n)]['mean'][layer][h], r['shares'][str(n)]['uniform']
                    cells.append(f'{share:.0%} (contrast {share / (1 - share) * (1 - u) / u:.0f})')
                lines.append(f"| {name}, s{s}, {layer}.{h} ({r['gates'][layer][h]:.2f}) | " + ' | '.join(cells) + ' |')
            uniform = [f"{r['shares'][str(n)]['uniform']:.1%}" for n in length_list]
    if uniform:
        lines.append('| uniform | ' + ' | '.join(uniform) + ' |')
    return lines


def run_list(text, default_iters):
    """--runs: 'paper,sharp_boost@9000' -> [('paper', default_iters), ('sharp_boost', 9000)]."""
    out = []
    for item in parse_list('runs', text, str):
        name, _, iters = item.partition('@')
        if name not in RUNS:
            raise SystemExit(f"unknown run '{name}', choose from: {', '.join(RUNS)}")
        if iters and not iters.isdigit():
            raise SystemExit(f"--runs={text}: '{item}' should be a run name, or name@iterations like {name}@9000")
        out.append((name, int(iters) if iters else default_iters))
    return out


def main(argv):
    settings, _ = configure(argv, FLAGS, __doc__)
    runs_ = run_list(settings.runs, settings.max_iters)
    seed_list = parse_list('seeds', settings.seeds, int)
    length_list = parse_list('lengths', settings.lengths, int)
    parse_list('depths', settings.depths, float)
    out = os.path.join(ROOT, settings.out_dir) if not os.path.isabs(settings.out_dir) else settings.out_dir
    data_dir = os.path.join(out, f'data{DATA_LENGTH}')
    folder = lambda name, iters, s: os.path.join(out, f'{name}-{iters}-s{s}')  # noqa: E731
    if settings.train:
        prepare_data(data_dir)
        for name, iters in runs_:
            for s in seed_list:
                base = None
                if name in BASE:  # its base run first, at the default length
                    base_dir = folder(BASE[name], settings.max_iters, s)
                    train_run(base_dir, RUNS[BASE[name]][0], s, settings.max_iters, data_dir)
                    base = os.path.join(base_dir, 'ckpt.pt')
                train_run(folder(name, iters, s), RUNS[name][0], s, iters, data_dir, base)
    if not settings.evaluate:
        return
    results = {}
    for name, iters in runs_:
        for s in seed_list:
            ckpt_path = os.path.join(folder(name, iters, s), 'ckpt.pt')
            if not finished(ckpt_path, iters):
                print(f'{name}, {iters} iterations, seed {s}: not trained yet (python experiments/infini_passkey.py '
                      f'--runs={name}@{iters} --seeds={s})')
                continue
            results.setdefault(f'{name}, {iters} it', {})[s] = evaluate_checkpoint(ckpt_path, settings)
    names = dict.fromkeys(name for name, _ in runs_)  # each described once
    lines = [f'{name}: {RUNS[name][1]}' for name in names] + [''] + tables(results, length_list)
    text = '\n'.join(lines)
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
