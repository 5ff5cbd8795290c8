"""
One command for the best path to a passkey 4,096 times past the training length (docs/infini.md):

  python experiments/infini_recipe.py --seeds=1                  # train every stage, then test 256 to 1M tokens
  python experiments/infini_recipe.py --seeds=1,2,3 --train=False  # the tables of the seeds trained so far

The model is the one of docs/infini.md: 2 layers, 4 heads, 64 wide, segments of 64, the delta rule (eq. 5). Each
stage fine-tunes the one before (train.py --init_from) with a fresh warmup and cosine schedule:

  1. paper, 6,000 iterations: the paper's memory, sigma(x) = ELU(x) + 1 (eq. 3), on 256-token examples. Training
     with the sharper memory from the start learns to retrieve late or never; the smooth map is learned first.
  2. sharp4_boost63, 6,000: sigma(x) = ELU(4x) + 1 and the first write counted up to 64 times. The sharper map
     weighs a needle token far above a filler token; the crowded memory makes the model need that contrast.
  3. rms_sharp8, 1,000: each head's read at unit RMS, and ELU(8x) + 1. The read keeps its trained size however
     much filler dilutes it, and the still sharper map keeps its direction past 64k tokens.
  4. three fine-tunes with ELU(16x) + 1, 1,000 each: on 256-token examples (sharp16), on 4,096-token examples
     (sharp16_4k: 63 segments in the memory), and at a quarter of the learning rate (sharp16_gentle). The models
     here that reach 1M tokens keep a contrast above about 25,000 at every digit's query; ELU(16x) + 1 gives it,
     but each fine-tune breaks a different digit's query in a different seed.
  5. their soup (Wortsman et al. 2022): the mean of their weights keeps what they share. A greedy soup adds the
     parts best first, each only if held-out prompts (another seed's, --soup_length tokens) do not get worse, so
     a part that collapsed cannot spoil the soup. --soup=uniform averages all three.
  6. the fallback: when the greedy soup misses a held-out key, its parts lack the contrast at that length. Then
     stage 3 is fine-tuned once more, keeping ELU(8x) + 1, for --fallback_iters on 4,096-token examples. Where a
     soup failed, only parts trained on long examples found keys at 64k (experiments/infini_recipe_notes.md), and
     longer training on them found more. Of the soup and stage 6, the one that finds more held-out keys at
     --fallback_length (64k) is tested; a tie keeps the soup. --fallback=False keeps the soup.

The model kept (the soup, or stage 6) is tested with its memory read on and off (A_mem = 0, the control),
streamed --chunk tokens at a time in bounded memory. Finished stages and measured lengths are reused; a stopped
run resumes. Tables go to out_dir/results.md. One process at a time; set OMP_NUM_THREADS to the cores you give it.
"""
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoints import load_model  # noqa: E402
from configurator import configure, flags_of  # noqa: E402
from experiments.common import prepare  # noqa: E402
from experiments.infini_passkey import (evaluate_checkpoint, evaluate_length, make_soup, parse_list,  # noqa: E402
                                        passkey_cases, train_run, trials_by_length)

# -----------------------------------------------------------------------------------------------------------
out_dir = 'out-infini-recipe'  # data, checkpoints and results.md (gitignored: out*/)
seeds = '1'                    # comma-separated training seeds, trained and tested in order
train = True                   # train the stages that have no finished checkpoint
iters = '6000,6000,1000,1000'  # iterations of stages 1, 2, 3 and of each part of the soup
n_train = 20000                # training examples per length
long_length = 4096             # the long examples of sharp16_4k and of stage 6
soup = 'greedy'                # 'greedy': parts that help on held-out prompts; 'uniform': all three
soup_length = 262144           # the held-out prompts' length for the greedy soup
soup_trials = 1                # held-out prompts per depth
soup_seed = 7                  # the held-out prompts' seed (the test prompts use --seed)
fallback = True                # a greedy soup that misses a held-out key gives way to stage 6
fallback_iters = 3000          # stage 6's iterations
fallback_length = 65536        # stage 6 or the soup: the one that finds more held-out keys this long is kept
fallback_trials = 2            # held-out prompts per depth for that choice
score = ''                     # runs of each seed (e.g. rms_sharp8,sharp16_4k): print their held-out scores, then stop
lengths = '256,1024,4096,16384,65536,262144,1048576'  # test prompt lengths (256 = the training length)
trials = '20,20,20,10,4,1,1'   # test prompts per depth, one per length (5 depths: 100, ..., 5 prompts)
depths = '0,0.25,0.5,0.75,1'   # where the passkey sits in the filler
batch_size = 20                # prompts per forward
chunk = 4096                   # prompt tokens per forward: the cache streams the prompt
seed = 1337                    # the test prompts
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------

# (name, the stage it fine-tunes, train.py flags, example length): examples longer than 256 tokens come fewer per
# batch, so an iteration reads 4,096 tokens at every length. memory_boost=63 stays from stage 2 on.
LONG = 'long'  # the example length --long_length (4,096 by default)
STAGES = [('paper', None, ['--attention=infini'], 256),
          ('sharp4_boost63', 'paper', ['--feature_scale=4', '--memory_boost=63'], 256),
          ('rms_sharp8', 'sharp4_boost63', ['--read_norm=rms', '--feature_scale=8'], 256)]
PARTS = [('sharp16', 'rms_sharp8', ['--read_norm=rms', '--feature_scale=16'], 256),
         ('sharp16_4k', 'rms_sharp8', ['--read_norm=rms', '--feature_scale=16'], LONG),
         ('sharp16_gentle', 'rms_sharp8', ['--read_norm=rms', '--feature_scale=16', '--learning_rate=5e-4',
                                           '--min_lr=5e-5'], 256)]
# stage 6, the fallback: ELU(8x) + 1 on long examples, longer than a part
FALLBACK = [('sharp8_4k_long', 'rms_sharp8', ['--read_norm=rms', '--feature_scale=8'], LONG)]
STAGE6 = FALLBACK[0][0]


def train_stages(settings, folder, s, runs, iters):
    """Train every run of seed s in runs (STAGES, PARTS or FALLBACK) that is not finished, in order, each for its
    count in iters."""
    for (name, base, flags, length), count in zip(runs, iters):
        n = settings.long_length if length == LONG else length
        data = prepare('passkey', os.path.join(folder, f'data{n}'),
                       [f'--length={n}', f'--n_train={settings.n_train}', '--n_val=200'])
        flags = flags + ([f'--block_size={n}', f'--batch_size={max(1, 16 * 256 // n)}'] if n != 256 else [])
        base_ckpt = os.path.join(folder, f's{s}', base, 'ckpt.pt') if base else None
        train_run(os.path.join(folder, f's{s}', name), flags, s, count, data, base_ckpt)


def held_out(ckpt, settings):
    """(accuracy, -digit loss) of a model on the held-out prompts, memory read on: higher is better."""
    model, _ = load_model(ckpt)
    depth_list = parse_list('depths', settings.depths, float)
    cases = passkey_cases(settings.soup_length, depth_list, settings.soup_trials, settings.soup_seed)
    score = evaluate_length(model, settings.soup_length, cases, ['on'], 'on', settings, depth_list)['scores']['on']
    return score['accuracy'], -score['digit_loss']


def fresh_soup(paths, run_dir):
    """make_soup, made anew: make_soup keeps a soup that is newer than its parts, whichever parts it had."""
    path = os.path.join(run_dir, 'ckpt.pt')
    if os.path.isfile(path):
        os.remove(path)
    make_soup(paths, run_dir)
    return path


def make_recipe_soup(settings, folder, s):
    """The soup of the parts: all of them, or greedily (best held-out part first, then each that does not hurt).
    Returns its folder, the names of the parts in it, and its held-out accuracy (None for the uniform soup)."""
    parts = [os.path.join(folder, f's{s}', name, 'ckpt.pt') for name, *_ in PARTS]
    run_dir = os.path.join(folder, f's{s}', f'soup_{settings.soup}')
    if settings.soup == 'uniform':
        make_soup(parts, run_dir)
        return run_dir, [name for name, *_ in PARTS], None
    log_path = os.path.join(run_dir, 'greedy.json')
    held = dict(length=settings.soup_length, trials=settings.soup_trials, seed=settings.soup_seed)
    before = json.load(open(log_path)) if os.path.isfile(log_path) else {}
    fresh = all(os.path.getmtime(p) <= os.path.getmtime(log_path) for p in parts) if before else False
    if fresh and {k: before.get(k) for k in held} == held and 'accuracy' in before:
        chosen, accuracy = before['chosen'], before['accuracy']  # chosen from these parts and prompts before
    else:
        scores = {p: held_out(p, settings) for p in parts}
        ranked = sorted(parts, key=scores.get, reverse=True)
        chosen, best = ranked[:1], scores[ranked[0]]
        for part in ranked[1:]:
            trial = fresh_soup(chosen + [part], os.path.join(run_dir, 'trial'))
            scores[' + '.join(chosen + [part])] = score = held_out(trial, settings)
            os.remove(trial)
            if score >= best:
                chosen, best = chosen + [part], score
        fresh_soup(chosen, run_dir)  # a soup of one part is that part's weights
        accuracy = best[0]
        with open(log_path, 'w') as f:
            json.dump(dict(chosen=chosen, accuracy=accuracy, scores=scores, **held), f, indent=1)
    return run_dir, [os.path.basename(os.path.dirname(p)) for p in chosen], accuracy


def train_minutes(folder, s, runs):
    """Minutes of training of the runs (log.csv's time_s, evaluations included)."""
    total = 0.0
    for name, *_ in runs:
        with open(os.path.join(folder, f's{s}', name, 'log.csv')) as f:
            total += float(f.read().strip().splitlines()[-1].split(',')[2])
    return total / 60


def trained(folder, s, runs):
    """True when every run of seed s has its checkpoint."""
    return all(os.path.isfile(os.path.join(folder, f's{s}', name, 'ckpt.pt')) for name, *_ in runs)


def table(s, result, minutes, model, length_list):
    """Markdown: one row per length, the memory read on and off."""
    lines = [f'### Seed {s}: {model}; {minutes:.0f} minutes of training', '',
             '| length | prompts | read on: accuracy / digit loss | read off (A_mem = 0) | s per prompt (on) '
             '| peak MB |',
             '|---:|---:|---:|---:|---:|---:|']
    for n in length_list:
        e = result['lengths'][str(n)]
        on, off = e['scores']['on'], e['scores']['off']
        lines.append(f"| {n:,} ({n // 256:,}x) | {e['prompts']} | {on['accuracy']:.0%} / {on['digit_loss']:.2f} | "
                     f"{off['accuracy']:.0%} / {off['digit_loss']:.2f} | {e['seconds']['on'] / e['prompts']:.2f} | "
                     f"{e['peak_rss_mb']:.0f} |")
    return lines + ['']


def main(argv):
    settings, _ = configure(argv, FLAGS, __doc__)
    seed_list = parse_list('seeds', settings.seeds, int)
    length_list = parse_list('lengths', settings.lengths, int)
    trials_by_length(settings.trials, length_list)
    counts = parse_list('iters', settings.iters, int)
    if len(counts) != 4 or min(counts) < 1:
        raise SystemExit(f'--iters={settings.iters}: four positive counts (stages 1, 2, 3 and each part)')
    if settings.fallback_iters < 1:
        raise SystemExit(f'--fallback_iters={settings.fallback_iters}: a positive count')
    if settings.soup not in ('greedy', 'uniform'):
        raise SystemExit(f"--soup={settings.soup}: 'greedy' or 'uniform'")
    folder = settings.out_dir if os.path.isabs(settings.out_dir) else os.path.join(ROOT, settings.out_dir)
    # the evaluation's settings (infini_passkey.evaluate_checkpoint): the memory read on and off at every length
    test = types.SimpleNamespace(**vars(settings), all_reads_up_to=0, read_gain='')
    if settings.score:  # which runs find the held-out keys: no training, no table
        for s in seed_list:
            for name in settings.score.split(','):
                path = os.path.join(folder, f's{s}', name, 'ckpt.pt')
                if not os.path.isfile(path):
                    raise SystemExit(f'--score: {path} does not exist (name a run or soup folder of seed {s})')
                accuracy, loss = held_out(path, test)
                print(f'seed {s}, {name}: {accuracy:.0%} of the held-out keys at {settings.soup_length:,} tokens, '
                      f'digit loss {-loss:.2f}', flush=True)
        return
    lines = ['## The recipe (experiments/infini_recipe.py): passkey accuracy by prompt length', '',
             "(s per prompt: with the memory read on, in batches of --batch_size; peak MB: the process's peak "
             "resident memory so far, CPU)", '']
    for s in seed_list:
        if settings.train:
            train_stages(settings, folder, s, STAGES + PARTS, counts[:3] + counts[3:] * len(PARTS))
        if not trained(folder, s, PARTS):
            print(f'seed {s}: not trained yet (python experiments/infini_recipe.py --seeds={s})')
            continue
        run_dir, chosen, accuracy = make_recipe_soup(test, folder, s)
        runs, model = STAGES + PARTS, f'soup of {", ".join(chosen)}'
        if settings.fallback and accuracy is not None and accuracy < 1:
            print(f'seed {s}: the greedy soup finds {accuracy:.0%} of the held-out keys; stage 6 is tried', flush=True)
            if settings.train:
                train_stages(settings, folder, s, FALLBACK, [settings.fallback_iters])
            if not trained(folder, s, FALLBACK):
                print(f'seed {s}: stage 6 not trained yet (python experiments/infini_recipe.py --seeds={s})')
                continue
            runs = runs + FALLBACK
            # the model that finds more held-out keys at --fallback_length is kept; a tie keeps the soup
            check = types.SimpleNamespace(**{**vars(test), 'soup_length': settings.fallback_length,
                                             'soup_trials': settings.fallback_trials})
            stage6 = os.path.join(folder, f's{s}', STAGE6)
            soup_score, stage6_score = (held_out(os.path.join(d, 'ckpt.pt'), check) for d in (run_dir, stage6))
            print(f'seed {s}: held-out keys at {settings.fallback_length:,} tokens: the soup {soup_score[0]:.0%}, '
                  f'stage 6 {stage6_score[0]:.0%}', flush=True)
            if stage6_score[0] > soup_score[0]:  # accuracy alone: a lower digit loss does not break a tie
                run_dir, model = stage6, f'stage 6, {STAGE6}'
            else:
                model += ', kept over stage 6'
        result = evaluate_checkpoint(os.path.join(run_dir, 'ckpt.pt'), test)
        lines += table(s, result, train_minutes(folder, s, runs), model, length_list)
        print('\n'.join(lines[-len(length_list) - 5:]), flush=True)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main(sys.argv[1:])
