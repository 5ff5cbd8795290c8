"""
Does Infini-attention's compressive memory retrieve a passkey past the training length? (infini_lab.md)

Trains small models on 256-token passkey examples, then tests them on longer prompts, with the memory read on
and switched off, and measures how the memory's read weight spreads as prompts grow:

  python experiments/infini_passkey.py --runs=paper --seeds=1                   # the paper's mechanism
  python experiments/infini_passkey.py --runs=sharp_boost63@9000 --seeds=1,2    # two changes, 9,000 iterations
  python experiments/infini_passkey.py --runs=local,causal --seeds=1            # the controls
  python experiments/infini_passkey.py --runs=paper_then_sharp_boost63@3000 --seeds=1,2,3   # paper, then both
  python experiments/infini_passkey.py --train=False --runs=paper,sharp_boost63@9000,causal --seeds=1,2  # tables
  python experiments/infini_passkey.py --train=False --runs=paper_then_sharp_boost63@6000 --seeds=5 \
      --lengths=256,4096,16384,65536,262144,1048576 --trials=20,20,4,2,1,1      # to 1M tokens, fewer prompts far out

experiments/infini_lab.md, the lab notebook, has the commands behind its numbers and reads them.

Each run trains once (out_dir/<run>-<iterations>-s<seed>/ckpt.pt is reused; a stopped run resumes) and is evaluated
once per length (eval.json beside the checkpoint keeps each length while its flags stay the same). A soup (SOUPS)
trains nothing: its checkpoint is the mean of its parts' weights (make_soup), and its parts train first. Prompts stream
through the model's cache --chunk tokens at a time, so memory stays bounded at any length; a progress bar shows
lengths from 16k on. The tables are printed and written to out_dir/results.md. One training process at a time;
set OMP_NUM_THREADS to the cores you give it.

What is measured, per checkpoint and prompt length (lengths x depths x trials examples, the same for every model):
  accuracy     the share of examples whose 5 digits greedy decoding gets exactly right
  digit loss   the mean cross-entropy of the 5 digits (ln 10 = 2.30 is a uniform guess)
  needle share per head: the share of its memory-read weight sigma(q).sigma(k_j) (eq. 3) that falls on the
               passkey sentence, at the last prompt token (attention_infini.memory_weights)
The memory-read ablations (GPTConfig.memory_read: 'off' = A_mem = 0, 'local' = gate 0) use the same weights.
Also: the read probe of each head (read_probe: the read split into what the needle wrote and what the rest
wrote), by depth and at each digit's query; accuracy by depth and of each digit; seconds per prompt and the
process's peak memory.
"""
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from attention_infini import gate_values, memory_weights, read_memory, sigma  # noqa: E402
from checkpoints import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from data.tokenizers import ByteTokenizer  # noqa: E402
from data.passkey.task import NEEDLE, make_passkey  # noqa: E402
from tools.evaluate import answer_scores, answer_token_scores  # noqa: E402
from experiments.common import finished, prepare, run_train  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out-infini-passkey'   # data, checkpoints, evaluations and results.md go here (gitignored: out*/)
runs = 'paper,sharp_boost63'    # comma-separated names of RUNS below; name@iterations trains that run longer
seeds = '1'                     # comma-separated training seeds
train = True                    # train the runs that have no finished checkpoint
evaluate = True                 # evaluate every finished checkpoint of the runs and seeds, print the tables
max_iters = 6000                # training iterations of a run named without @iterations
n_train = 20000                 # training examples per example length
lengths = '256,1024,2048,4096'  # prompt lengths to test (256 = the training length)
depths = '0,0.25,0.5,0.75,1'    # where the passkey sits, as a fraction of the filler
trials = '20'                   # examples per (length, depth): one number, or one per length (fewer at far lengths)
batch_size = 20                 # examples per forward in the evaluation
chunk = 4096                    # prompt tokens per forward: the cache streams the prompt, memory stays bounded
all_reads_up_to = 4096          # longer prompts are tested with the memory read on and off only (time)
read_gain = ''                  # 'layer.head:gain' ('1.2:2'): that head's read counts gain times (scale_memory_read)
seed = 1337                     # the evaluation's examples
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------

# the model and schedule every run shares: 2 layers, 4 heads, 64 wide, segments of 64, delta rule
COMMON = ['--dataset=passkey', '--n_layer=2', '--n_head=4', '--n_embd=64', '--block_size=256', '--segment_len=64',
          '--memory_update=delta', '--batch_size=16', '--learning_rate=2e-3', '--eval_interval=1000',
          '--eval_iters=10', '--device=cpu', '--dtype=float32', '--compile=False']
# The runs the lab notebook's main line needs. The notebook keeps the numbers of the runs that left the script, with
# the revision whose script still makes them (infini_lab.md, "Runs no longer in the script").
RUNS = {  # name: (train.py flags, what it is)
    'paper': (['--attention=infini'], "the paper's mechanism: sigma = ELU + 1, no boost"),
    'sharp_boost63': (['--attention=infini', '--feature_scale=4', '--memory_boost=63'],
                      'sigma(x) = ELU(4x) + 1 and the first write counted up to 64 times (a 4k prompt holds 63 '
                      'segments), from scratch'),
    'local': (['--attention=infini', '--memory_read=local'], 'control: infini trained with the memory read off '
              '(gate 0), local attention inside each segment only'),
    'causal': (['--attention=causal', '--positions=learned'],
               'control: causal attention over the whole 256-token context'),
    'paper_then_sharp_boost63': (['--feature_scale=4', '--memory_boost=63'],
                                 "two stages: the paper's mechanism (the paper run, --max_iters iterations), then "
                                 "fine-tuned with both changes (boost 63) for the run's own iterations"),
    'paper_then_more': ([], 'two stages, the second with neither change: the control for the extra training'),
    # the read at unit RMS keeps its training-time size however much filler dilutes it, and a sharper feature map
    # keeps its direction past 64k (infini_lab.md, "A third stage")
    'paper_then_sharp_boost63_then_rms_sharp8': (['--read_norm=rms', '--feature_scale=8'],
                                                 'three stages: the two-stage run, then fine-tuned with the read at '
                                                 'unit RMS and sigma(x) = ELU(8x) + 1'),
    # fourth stages: the same training longer (the control), or longer examples (4 per batch at 1,024 tokens and one
    # at 4,096 keep the tokens per iteration), or a memory as crowded as a 64k prompt's (the first write counts up
    # to 1,024 times)
    'paper_then_sharp_boost63_then_rms_sharp8_then_more': (['--read_norm=rms', '--feature_scale=8'],
                                                           'four stages: the rms+sharp8 third stage, then the same '
                                                           'training longer: the control for the fourth stages'),
    'paper_then_sharp_boost63_then_rms_sharp8_then_1k': (['--block_size=1024', '--batch_size=4', '--read_norm=rms',
                                                          '--feature_scale=8'],
                                                         'four stages: the rms+sharp8 third stage, then fine-tuned '
                                                         'on 1,024-token examples'),
    'paper_then_sharp_boost63_then_rms_sharp8_then_4k': (['--block_size=4096', '--batch_size=1', '--read_norm=rms',
                                                          '--feature_scale=8'],
                                                         'four stages: the rms+sharp8 third stage, then fine-tuned '
                                                         'on 4,096-token examples'),
    'paper_then_sharp_boost63_then_rms_sharp8_then_4k_boost1023': (['--block_size=4096', '--batch_size=1',
                                                                    '--read_norm=rms', '--feature_scale=8',
                                                                    '--memory_boost=1023'],
                                                                   'four stages: the rms+sharp8 third stage, then '
                                                                   'fine-tuned on 4,096-token examples with the '
                                                                   'first write boosted up to 1,024 times'),
    # a model soup (Wortsman et al. 2022): the mean of the weights of runs fine-tuned from one checkpoint. Each
    # fourth stage breaks a different digit's query in a different seed (infini_lab.md); the mean keeps what the
    # fine-tunes share and averages out what each one broke on its own. Trains no weights of its own.
    'paper_then_sharp_boost63_then_rms_sharp8_soup': (None, 'the mean of the weights of the four fourth stages: '
                                                      'then_more, then_1k, then_4k, then_4k_boost1023 (each at the '
                                                      'iterations given)'),
}
# soups: what they average, each at the soup's iterations
SOUPS = {'paper_then_sharp_boost63_then_rms_sharp8_soup':
         [f'paper_then_sharp_boost63_then_rms_sharp8_{part}'
          for part in ('then_more', 'then_1k', 'then_4k', 'then_4k_boost1023')]}
TRAINING_ONLY = ('block_size', 'memory_boost')  # the parts of a soup may differ in these (the soup keeps the first's)
# runs that fine-tune another run's final checkpoint (train.py --init_from): the paper's mechanism trains first,
# which is fast, and the sharper, crowded memory is taught after (infini_lab.md, "Two stages")
# (which, with its iterations: None = --max_iters)
BASE = {name: ('paper', None) for name in RUNS if name.startswith('paper_then_') and name not in SOUPS}
BASE['paper_then_sharp_boost63_then_rms_sharp8'] = ('paper_then_sharp_boost63', 6000)
for name in ('then_more', 'then_1k', 'then_4k', 'then_4k_boost1023'):
    BASE[f'paper_then_sharp_boost63_then_rms_sharp8_{name}'] = ('paper_then_sharp_boost63_then_rms_sharp8', 1000)
DATA_LENGTH = 256  # the training examples' length
# runs trained on longer examples
TRAIN_LENGTH = {'paper_then_sharp_boost63_then_rms_sharp8_then_1k': 1024,
                'paper_then_sharp_boost63_then_rms_sharp8_then_4k': 4096,
                'paper_then_sharp_boost63_then_rms_sharp8_then_4k_boost1023': 4096}
EVAL_VERSION = 3  # what eval.json holds: bump when the measurements change, so older files are recomputed


def parse_list(flag, text, kind):
    try:
        values = [kind(x) for x in text.split(',') if x]
    except ValueError:
        raise SystemExit(f'--{flag}={text}: expected comma-separated {kind.__name__}s') from None
    if not values:
        raise SystemExit(f'--{flag} is empty')
    return values


def trials_by_length(text, length_list):
    """--trials: one number for every length, or one per length."""
    values = parse_list('trials', text, int)
    if len(values) == 1:
        values = values * len(length_list)
    if len(values) != len(length_list) or min(values) < 1:
        raise SystemExit(f'--trials={text}: one positive number, or one per length ({len(length_list)} lengths)')
    return dict(zip(length_list, values))


# -----------------------------------------------------------------------------------------------------------
# Training: train.py in a subprocess, one run at a time.

def train_run(run_dir, flags, train_seed, iters, data_dir, base=None):
    """Train (or resume) one run; base: the checkpoint a fine-tuning run starts from."""
    if not finished(run_dir, iters):
        warmup = min(20, iters // 10)  # train.py's 20 for every real run; shorter for a quick try
        run_train(run_dir, [*COMMON, *flags, f'--data_dir={data_dir}', f'--seed={train_seed}', f'--max_iters={iters}',
                            f'--warmup_iters={warmup}'], init_from=base)


def make_soup(paths, run_dir):
    """run_dir/ckpt.pt: the mean of the weights of the checkpoints at paths, made again when a part is newer. They
    must build the same model; they may differ in settings that only shape training. The rest is the first one's."""
    path = os.path.join(run_dir, 'ckpt.pt')
    if os.path.isfile(path) and all(os.path.getmtime(p) <= os.path.getmtime(path) for p in paths if os.path.isfile(p)):
        return
    parts = [load_checkpoint(p) for p in paths]
    first = parts[0]
    for other, checkpoint in zip(paths[1:], parts[1:]):
        args = first['model_args'].keys() | checkpoint['model_args'].keys()
        differ = sorted(k for k in args - set(TRAINING_ONLY)
                        if first['model_args'].get(k) != checkpoint['model_args'].get(k))
        if differ or checkpoint['model'].keys() != first['model'].keys():
            raise SystemExit(f"cannot average {other} with {paths[0]}: their models differ in "
                             f"{', '.join(differ) or 'their weights'}")
    soup = {key: value for key, value in first.items() if key != 'optimizer'}  # a soup is not resumed
    soup['model'] = {k: torch.stack([c['model'][k] for c in parts]).mean(0) if v.is_floating_point() else v
                     for k, v in first['model'].items()}
    soup['soup_of'] = list(paths)
    os.makedirs(run_dir, exist_ok=True)
    save_checkpoint(soup, path)


# -----------------------------------------------------------------------------------------------------------
# Evaluation

def passkey_cases(length, depth_list, trials, seed):
    """trials examples per depth: (prompt ids, answer ids, needle start, needle length), the same for every model."""
    tok = ByteTokenizer()
    needle_head = tok.encode(NEEDLE.split('{key}')[0])  # '\nThe pass key is ': only the needle starts so
    out = []
    for depth in depth_list:
        rng = np.random.default_rng([seed, length, int(depth * 1000)])
        for _ in range(trials):
            prompt, answer = make_passkey(length, depth, rng, tok)
            start = next(i for i in range(len(prompt)) if prompt[i:i + len(needle_head)] == needle_head)
            needle_len = len(tok.encode(NEEDLE.format(key=tok.decode(answer))))
            out.append((prompt, answer, start, needle_len))
    return out


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


@torch.no_grad()
def stream_score(model, batch, chunk=4096, probe=False, bar=None, **options):
    """evaluate.answer_scores through the streaming cache, `chunk` tokens of the prompt at a time, then the answer,
    so memory stays bounded whatever the length (the cache holds M, z and one segment). Returns per example whether
    all 5 digits are right and their mean loss (lists), digits (B, 5) bools: which digits are the most likely
    token, and with probe=True read_probe's numbers.

    probe=True measures the memory read of every head at the last prompt token (the query that predicts the first
    digit), split into what the needle wrote and what everything else wrote (read_probe); and the needle's share of
    the read's weight and of the read at each digit's query (digit_share, digit_read_share: B, digits, n_layer, H).
    Each segment that holds needle tokens is read as a chunk of its own, so the memory before it is the cache's, and
    what its tokens wrote is exact. options go to every forward."""
    config = model.config
    N, H, C = config.segment_len, config.n_head, config.n_embd
    D = C // H
    B, T = len(batch), len(batch[0][0])  # T: the prompt's length
    prompts = torch.tensor([p for p, _, _, _ in batch])
    answers = torch.tensor([a for _, a, _, _ in batch])
    starts = torch.tensor([s for _, _, s, _ in batch])
    ends = starts + torch.tensor([n for _, _, _, n in batch])
    chunk = max(N, chunk // N * N)  # whole segments, so a needle segment can start a chunk
    cuts = set(range(0, T - 1, chunk))
    if probe:
        for s, e in zip(starts.tolist(), ends.tolist()):
            cuts |= set(range(s // N * N, e + N, N))
    cuts = sorted(c for c in cuts if c < T - 1) + [T - 1]  # the last prompt token goes with the answer
    captured = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, i, o: captured.append(o))
             for block in model.transformer.h] if probe else []
    # per layer: sums over each example's needle tokens of sigma(k) (B, H, D) and of sigma(k)^T r (B, H, D, D)
    needle_k = torch.zeros(config.n_layer, B, H, D)
    needle_kr = torch.zeros(config.n_layer, B, H, D, D)
    try:
        cache = model.new_cache(B)
        for a, b in zip(cuts[:-1], cuts[1:]):
            pos = torch.arange(a, b)
            mask = ((pos >= starts[:, None]) & (pos < ends[:, None])).float().view(B, 1, b - a, 1)  # needle tokens
            needle_here = probe and bool(mask.any())
            before = (cache.M.clone(), cache.z.clone()) if needle_here and cache.M is not None else None
            captured.clear()
            model(prompts[:, a:b], cache=cache, **options)
            if bar is not None:
                bar.update(B * (b - a))
            if not needle_here:
                continue
            for layer, qkv in enumerate(captured):
                _, k, v = (t.view(B, b - a, H, D).transpose(1, 2).float() for t in qkv.split(C, dim=2))
                sk = sigma(k, config.feature_scale)
                r = v  # what a token writes: its value (eq. 4), less what the memory returned for its key (eq. 5)
                if config.memory_update == 'delta' and before is not None:
                    r = v - read_memory(sk, before[0][layer].float(), before[1][layer].float())
                needle_k[layer] += (sk * mask).sum(-2)
                needle_kr[layer] += (sk * mask).transpose(-1, -2) @ r
        # the memories the answer's queries read, with how many tokens each holds: the one before the answer's
        # forward, and the one after it (it also holds the segment that the answer's forward completed, if any)
        memories = {}
        if cache.M is not None:
            memories[cache.length // N * N] = (cache.M.clone().float(), cache.z.clone().float())
        captured.clear()
        x = torch.cat((prompts[:, -1:], answers[:, :-1]), dim=1)  # each predicts the next digit
        logits, _ = model(x, answers, cache=cache, **options)
        memories.setdefault(cache.length // N * N, (cache.M.clone().float(), cache.z.clone().float()))
    finally:
        for hook in hooks:
            hook.remove()
    digits, losses = answer_token_scores(logits, answers)
    probed = None
    if probe and cache.M is not None:
        by_digit = []
        for d in range(x.size(1)):  # the query at prompt position T - 1 + d predicts digit d
            stored = (T - 1 + d) // N * N  # the complete segments before the query's segment are in the memory
            if stored not in memories:  # the answer's forward completed a segment after this query: no memory kept
                by_digit.append(None)
                continue
            queries = [qkv.split(C, dim=2)[0][:, d].view(B, H, 1, D).float() for qkv in captured]
            p = read_probe(queries, memories[stored], needle_k, needle_kr, config.feature_scale)
            for key in p:  # where the needle is not all in the memory yet, there is nothing to measure
                p[key][ends > stored] = float('nan')
            by_digit.append(p)
        probed = dict(by_digit[0])  # the first digit's query: the probe the tables show by default
        for key in ('share', 'read_share'):  # (B, digits, n_layer, H)
            nan = torch.full_like(by_digit[0][key], float('nan'))
            probed[f'digit_{key}'] = torch.stack([nan if p is None else p[key] for p in by_digit], dim=1)
    return digits.all(-1).tolist(), losses.tolist(), digits, probed


def read_probe(queries, memory, needle_k, needle_kr, feature_scale):
    """The memory read of each layer and head at one query, split by who wrote it. Returns (B, n_layer, H) tensors.

    The memory is M = sum_j sigma(k_j)^T r_j and z = sum_j sigma(k_j) over every stored token j, r_j being what j
    wrote (its value, less under the delta rule what the memory returned for its key then). So the read (eq. 3) is
    A_mem = sum_j w_j r_j with w_j = sigma(q).sigma(k_j) / sigma(q) z: the needle's part is the sum over needle tokens,
    sigma(q) (sum_needle sigma(k_j)^T r_j) / sigma(q) z, exactly, and the rest is what the other tokens wrote.
      share       sum of w_j over the needle: the needle's share of the read's weight (memory_weights)
      read_share  the needle part's projection on A_mem, over |A_mem|^2: its share of the read as a vector
                  (1: the read is the needle's; it falls when the rest is large or points elsewhere)
      cos         cosine between A_mem and the needle part
      norm        |A_mem|, the read's size"""
    M, z = memory
    out = {k: [] for k in ('share', 'read_share', 'cos', 'norm')}
    for layer, q in enumerate(queries):
        sq = sigma(q, feature_scale)  # (B, H, 1, D)
        a_mem = read_memory(sq, M[layer], z[layer])[:, :, 0]  # eq. 3, (B, H, D)
        denom = (sq @ z[layer].unsqueeze(-1)).clamp_min(1e-6)[:, :, 0]  # sigma(q) z, (B, H, 1)
        share = (sq[:, :, 0] * needle_k[layer]).sum(-1) / denom[..., 0]
        part = (sq @ needle_kr[layer])[:, :, 0] / denom
        norm2 = (a_mem * a_mem).sum(-1)
        out['share'].append(share)
        out['read_share'].append((part * a_mem).sum(-1) / norm2.clamp_min(1e-12))
        out['cos'].append(torch.nn.functional.cosine_similarity(part, a_mem, dim=-1))
        out['norm'].append(norm2.sqrt())
    return {k: torch.stack(v, dim=1) for k, v in out.items()}


def peak_rss_mb():
    """The process's peak resident memory so far (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)


def evaluate_length(model, length, cases, reads, trained_read, settings, depth_list):
    """Scores per memory_read, and for a model that reads its memory the read probe, at one prompt length."""
    infini = model.config.attention == 'infini'
    out = dict(prompts=len(cases), scores={}, seconds={})
    bar = tqdm(total=len(reads) * len(cases) * (length - 1), unit='tok', unit_scale=True, dynamic_ncols=True,
               desc=f'{length} tokens', disable=length < 16384, leave=False)
    for read in reads:
        options = {}  # the memory read of each layer, passed to every forward (attention_infini.py)
        if infini:
            options['memory_read'] = [{'on': trained_read, f'off L{layer}': 'off'}.get(
                read, read if read in ('off', 'local') else 'on') for layer in range(model.config.n_layer)]
        probe = read == 'on' and trained_read == 'on'
        correct, losses, digits, probes = [], [], [], []
        started = time.time()
        for i in range(0, len(cases), settings.batch_size):
            batch = cases[i:i + settings.batch_size]
            if model.streams:
                right, loss, digit_right, probed = stream_score(model, batch, settings.chunk, probe, bar, **options)
                digits.append(digit_right)
                probes += [] if probed is None else [probed]
            else:  # a fixed-context model reads its whole (short) prompt in one forward
                digit_right, loss = answer_scores(model, torch.tensor([p for p, _, _, _ in batch]),
                                                  torch.tensor([a for _, a, _, _ in batch]), **options)
                right, loss = digit_right.all(-1).tolist(), loss.tolist()
            correct, losses = correct + right, losses + loss
        out['seconds'][read] = time.time() - started
        depths = np.repeat(depth_list, len(cases) // len(depth_list))
        out['scores'][read] = dict(accuracy=float(np.mean(correct)), digit_loss=float(np.mean(losses)),
                                   by_depth=[float(np.mean(np.array(correct)[depths == d])) for d in depth_list])
        if digits:
            out['scores'][read]['digits'] = torch.cat(digits).float().mean(0).tolist()  # accuracy of each digit
        if probes:
            probed = {k: torch.cat([p[k] for p in probes]) for k in probes[0]}
            digit_keys = [k for k in probed if k.startswith('digit_')]
            out['probe_digits'] = {k[len('digit_'):]: torch.nanmean(probed.pop(k), dim=0).tolist() for k in digit_keys}
            out['probe'] = {k: torch.nanmean(v, dim=0).tolist() for k, v in probed.items()}
            by = torch.tensor(depths)
            out['probe_by_depth'] = {k: [torch.nanmean(v[by == d], dim=0).tolist() for d in depth_list]
                                     for k, v in probed.items()}
            out['shares'] = dict(mean=out['probe']['share'], n=int((~probed['share'][:, 0, 0].isnan()).sum()),
                                 uniform=cases[0][3] / ((length - 1) // model.config.segment_len *
                                                        model.config.segment_len))
        tqdm.write(f'  memory_read={read} length={length} accuracy={np.mean(correct):.0%} '
                   f'digit loss={np.mean(losses):.2f} ({len(cases)} prompts, {out["seconds"][read]:.0f} s)')
    bar.close()
    out['peak_rss_mb'] = peak_rss_mb()
    return out


def parse_read_gain(text):
    """--read_gain='1.2:2' -> (1, 2, 2.0); '' -> None."""
    if not text:
        return None
    try:
        where, gain = text.split(':')
        layer, head = (int(x) for x in where.split('.'))
        return layer, head, float(gain)
    except ValueError:
        raise SystemExit(f"--read_gain={text}: expected layer.head:gain, like 1.2:2") from None


def scale_memory_read(model, layer, head, gain):
    """Edit a trained model's weights so that one head's memory read counts `gain` times in its output, its local
    attention as before: a test of whether the read's size limits retrieval (infini_lab.md, "Where retrieval is
    lost"). The memory is linear in the values (every write is sigma(K)^T times values, less reads of earlier
    values; eq. 4-5), so scaling the head's value weights by c scales A_mem and A_dot by c. A gate g' = gain g / c,
    with c = gain g + 1 - g, then gives the head gain g A_mem + (1 - g) A_dot (eq. 6)."""
    if not (0 <= layer < len(model.transformer.h) and 0 <= head < model.config.n_head and gain > 0):
        raise SystemExit(f'--read_gain: no head {layer}.{head} in this model, or gain {gain} is not positive')
    attn = model.transformer.h[layer].attn
    C, D = attn.n_embd, attn.n_embd // attn.n_head
    with torch.no_grad():
        g = torch.sigmoid(attn.beta[head].double())
        c = gain * g + 1 - g
        values = slice(2 * C + head * D, 2 * C + (head + 1) * D)  # c_attn's output is q, k, v; heads in order
        attn.c_attn.weight[values] *= c.float()
        if attn.c_attn.bias is not None:
            attn.c_attn.bias[values] *= c.float()
        attn.beta[head] = torch.logit(gain * g / c).float()


def evaluate_checkpoint(ckpt_path, settings):
    """Accuracy, digit loss (per memory_read for infini), the read probe, time and memory by length. Each length is
    cached in eval.json beside the checkpoint, and reused while its settings and the checkpoint stay the same."""
    gain = parse_read_gain(settings.read_gain)
    name = f'eval-gain{settings.read_gain}.json' if gain else 'eval.json'
    cache_path = os.path.join(os.path.dirname(ckpt_path), name)
    mtime = os.path.getmtime(ckpt_path)
    cached = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            cached = json.load(f)
        if cached.get('version') != EVAL_VERSION or cached.get('ckpt_mtime') != mtime:
            cached = {}
    length_list = parse_list('lengths', settings.lengths, int)
    depth_list = parse_list('depths', settings.depths, float)
    trials = trials_by_length(settings.trials, length_list)
    model = checkpoint = None
    result = dict(version=EVAL_VERSION, ckpt_mtime=mtime, lengths=cached.get('lengths', {}))
    for length in length_list:
        key = dict(depths=depth_list, trials=trials[length], seed=settings.seed,
                   all_reads_up_to=settings.all_reads_up_to)
        if result['lengths'].get(str(length), {}).get('key') == key:
            continue
        if model is None:
            model, checkpoint = load_model(ckpt_path)
            if gain:
                scale_memory_read(model, *gain)
        infini = model.config.attention == 'infini'
        if not model.streams and length - 1 > model.config.block_size:  # an example is `length` tokens
            continue  # a fixed-context model cannot read the prompt (cropped, the needle is often gone)
        # 'on' holds each model as trained; a model trained with the memory read on is also tested without it, in
        # every layer ('off', 'local') and in one layer at a time ('off L0': layer 0's read off, the others on).
        # Past all_reads_up_to tokens, 'on' and 'off' only: each read of a long prompt takes minutes on a CPU.
        trained_read = model.config.memory_read if infini else None
        reads = ['on']
        if trained_read == 'on' and not gain:
            reads += ['off'] + (['local'] + [f'off L{layer}' for layer in range(model.config.n_layer)]
                                if length <= settings.all_reads_up_to else [])
        cases = passkey_cases(length, depth_list, trials[length], settings.seed)
        entry = evaluate_length(model, length, cases, reads, trained_read, settings, depth_list)
        result['lengths'][str(length)] = dict(key=key, **entry)
        with open(cache_path + '.tmp', 'w') as f:  # after every length: a stopped evaluation keeps what it measured
            json.dump(result, f, indent=1)
        os.replace(cache_path + '.tmp', cache_path)
    if model is not None:
        result['gates'] = gate_values(model).tolist() if model.config.attention == 'infini' else None
        result['iter_num'] = checkpoint.get('iter_num')
    else:
        result['gates'], result['iter_num'] = cached.get('gates'), cached.get('iter_num')
    with open(cache_path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(cache_path + '.tmp', cache_path)
    # the shape the tables read: scores['<read> <length>'], shares['<length>'], for the lengths asked for
    result['scores'] = {f'{read} {n}': s for n in length_list for read, s in
                        result['lengths'].get(str(n), {}).get('scores', {}).items()}
    result['shares'] = {str(n): result['lengths'][str(n)]['shares'] for n in length_list
                        if 'shares' in result['lengths'].get(str(n), {})}
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
                cells = [f"{c['accuracy']:.0%} / {c['digit_loss']:.2f}" if c else  # past all_reads_up_to: on, off only
                         'not measured' if f'on {n}' in r['scores'] else 'cannot' for c, n in zip(scores, length_list)]
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
            for layer, h in retrieving_heads(r, length_list):
                cells = []
                for n in length_list:
                    if str(n) not in r['shares']:
                        cells.append('')
                        continue
                    share, u = r['shares'][str(n)]['mean'][layer][h], r['shares'][str(n)]['uniform']
                    cells.append(f'{share:.0%} (contrast {share / (1 - share) * (1 - u) / u:.0f})')
                lines.append(f"| {name}, s{s}, {layer}.{h} ({r['gates'][layer][h]:.2f}) | " + ' | '.join(cells) + ' |')
            uniform = [f"{r['shares'][str(n)]['uniform']:.1%}" if str(n) in r['shares'] else '' for n in length_list]
    if uniform:
        lines.append('| uniform | ' + ' | '.join(uniform) + ' |')
    return lines + diagnosis_tables(results, length_list, head, rule)


def retrieving_heads(r, length_list):
    """(layer, head) of the heads that put at least half their read's weight on the needle at the first length."""
    if str(length_list[0]) not in r['shares']:
        return []
    return list(zip(*np.nonzero(np.array(r['shares'][str(length_list[0])]['mean']) >= 0.5)))


def diagnosis_tables(results, length_list, head, rule):
    """Markdown: what each number costs, accuracy by depth and by digit, and the read probe of the retrieving heads."""
    def entries(r):
        return [r['lengths'].get(str(n)) for n in length_list]

    lines = ['', 'Cost: prompts per number (per read), seconds per prompt with the memory read on (probe included), '
             "and the process's peak resident memory after the length (it only grows; CPU):", '',
             head.replace('| run |', '| run, seed |'), rule]
    for name, per_seed in results.items():
        for s, r in per_seed.items():
            cells = [f"{e['prompts']} prompts, {e['seconds']['on'] / e['prompts']:.1f} s, {e['peak_rss_mb']:.0f} MB"
                     if e else '' for e in entries(r)]
            lines.append(f'| {name}, s{s} | ' + ' | '.join(cells) + ' |')

    lines += ['', 'Accuracy by depth (memory read on): the needle at 0 / 0.25 / 0.5 / 0.75 / 1 of the filler '
              '(0 = right after the start, 1 = just before the question):', '',
              head.replace('| run |', '| run, seed |'), rule]
    for name, per_seed in results.items():
        for s, r in per_seed.items():
            cells = [' / '.join(f'{a:.0%}' for a in e['scores']['on']['by_depth']) if e else '' for e in entries(r)]
            lines.append(f'| {name}, s{s} | ' + ' | '.join(cells) + ' |')

    lines += ['', 'Accuracy of each of the 5 digits (memory read on; each given the right digits before it):', '',
              head.replace('| run |', '| run, seed |'), rule]
    for name, per_seed in results.items():
        for s, r in per_seed.items():
            cells = [' / '.join(f'{a:.0%}' for a in e['scores']['on']['digits'])
                     if e and 'digits' in e['scores']['on'] else '' for e in entries(r)]
            lines.append(f'| {name}, s{s} | ' + ' | '.join(cells) + ' |')

    def head_rows(cell):
        """One row per seed and retrieving head: cell(entry, layer, head) for each length."""
        rows = []
        for name, per_seed in results.items():
            for s, r in per_seed.items():
                for layer, h in retrieving_heads(r, length_list):
                    cells = [cell(e, layer, h) if e else '' for e in entries(r)]
                    rows.append(f'| {name}, s{s}, {layer}.{h} | ' + ' | '.join(cells) + ' |')
        return rows

    def shares(values, layer, h):
        """'96% / 45% / -': one head's value in each of a list of (layer, head) arrays; '-' where nan."""
        return ' / '.join('-' if np.isnan(x[layer][h]) else f'{x[layer][h]:.0%}' for x in values)

    def first_query(e, layer, h):
        p = e.get('probe')
        return f"{p['share'][layer][h]:.0%} / {p['read_share'][layer][h]:.0%} / {p['norm'][layer][h]:.2f}" if p else ''

    def each_digit(e, layer, h):
        p = e.get('probe_digits')  # absent from evaluations made before the script measured it
        return f"{shares(p['share'], layer, h)} ; {shares(p['read_share'], layer, h)}" if p else 'not measured'

    def by_depth(e, layer, h):
        p = e.get('probe_by_depth')
        return shares(p['share'], layer, h) if p else ''

    by_head = head.replace('| run |', '| run, seed, layer.head |')
    lines += ['', "The read probe (read_probe) of the heads that retrieve, at the query of the first digit: share of "
              "the read's weight on the needle / the needle part's share of the read as a vector / the read's size "
              "|A_mem|:", '', by_head, rule] + head_rows(first_query)
    lines += ['', "The read probe at each digit's query (the first digit's query is the last prompt token; the "
              "others are the answer's tokens, each given the right digits before it): the needle's share of the "
              "read's weight / of the read as a vector, for digits 1 / 2 / 3 / 4 / 5:", '', by_head, rule]
    lines += head_rows(each_digit)
    lines += ['', "The read probe by depth: the needle's share of the read's weight, for a needle at each depth of "
              "--depths ('-': the needle is not all in the memory yet):", '', by_head, rule] + head_rows(by_depth)
    return lines


def run_list(text, default_iters):
    """--runs: 'paper,sharp_boost63@9000' -> [('paper', default_iters), ('sharp_boost63', 9000)]."""
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
    run_plan = run_list(settings.runs, settings.max_iters)
    seed_list = parse_list('seeds', settings.seeds, int)
    length_list = parse_list('lengths', settings.lengths, int)
    parse_list('depths', settings.depths, float)
    trials_by_length(settings.trials, length_list)
    parse_read_gain(settings.read_gain)
    if settings.chunk < 1 or settings.batch_size < 1:
        raise SystemExit(f'--chunk={settings.chunk} and --batch_size={settings.batch_size} must be at least 1')
    out = os.path.join(ROOT, settings.out_dir) if not os.path.isabs(settings.out_dir) else settings.out_dir
    folder = lambda name, iters, s: os.path.join(out, f'{name}-{iters}-s{s}')  # noqa: E731

    def train_with_base(name, iters, s):
        """Train a run, after the run it fine-tunes (and that one's base) when it has one; a soup, after its parts."""
        if name in SOUPS:
            for part in SOUPS[name]:
                train_with_base(part, iters, s)
            make_soup([os.path.join(folder(part, iters, s), 'ckpt.pt') for part in SOUPS[name]], folder(name, iters, s))
            return
        base = None
        if name in BASE:
            base_name, base_iters = BASE[name]
            base_iters = base_iters or settings.max_iters
            train_with_base(base_name, base_iters, s)
            base = os.path.join(folder(base_name, base_iters, s), 'ckpt.pt')
        length = TRAIN_LENGTH.get(name, DATA_LENGTH)
        data_dir = prepare('passkey', os.path.join(out, f'data{length}'),
                           [f'--length={length}', f'--n_train={settings.n_train}', '--n_val=200'])
        train_run(folder(name, iters, s), RUNS[name][0], s, iters, data_dir, base)

    if settings.train:
        for name, iters in run_plan:
            for s in seed_list:
                train_with_base(name, iters, s)
    if not settings.evaluate:
        return
    results = {}
    for name, iters in run_plan:
        for s in seed_list:
            ckpt_path = os.path.join(folder(name, iters, s), 'ckpt.pt')
            if not finished(folder(name, iters, s), iters):
                print(f'{name}, {iters} iterations, seed {s}: not trained yet (python experiments/infini_passkey.py '
                      f'--runs={name}@{iters} --seeds={s})')
                continue
            results.setdefault(f'{name}, {iters} it', {})[s] = evaluate_checkpoint(ckpt_path, settings)
    names = dict.fromkeys(name for name, _ in run_plan)  # each described once
    lines = [f'{name}: {RUNS[name][1]}' for name in names] + [''] + tables(results, length_list)
    text = '\n'.join(lines)
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
