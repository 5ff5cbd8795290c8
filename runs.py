"""
A training run's bookkeeping, so that train.py can read as its loop: the rules a run follows (settings that could
not train, the lock on out_dir, resume and fine-tune, the data, divergence), and the numbers it writes (log.csv,
wandb).

The numbers: out_dir/log.csv, and the same numbers in Weights & Biases with --wandb_log=True. train.py appends
one row per log interval and one per evaluation. Columns, in this order; a cell is empty where the row has no
such number:

  iter          training steps done
  tokens        training tokens seen by then (iter x tokens per iteration)
  time_s        seconds since the run started, evaluations included (a resumed run continues the count)
  lr            the learning rate of the last step
  loss          the training loss of the last step's batch (log-interval rows)
  tokens_per_s  training tokens per second since the previous row (log-interval rows)
  mfu           model FLOPs utilisation in percent of an H100's bf16 peak (log-interval rows, CUDA only)
  train_loss    the mean loss over eval_iters training batches (evaluation rows)
  val_loss      the same over validation batches (evaluation rows)
  L<i>.<name>   what layer i's attention reports about itself at an evaluation (evaluation rows):
                  Infini-attention  gate<h>: head h's gate sigmoid(beta), the share of its output read from memory
                  Selective         masked: the share of (query, earlier token) pairs with F >= 1 (the token is
                                    gone); visible: how many tokens the last query still sees. Both on four val
                                    windows.
                causal and InAttention report nothing.

Each row is one write of one line, so a kill leaves every finished row readable. A resumed run keeps the rows up
to its checkpoint and continues the file; a run from scratch or a fine-tune starts a new one.
"""

import csv
import dataclasses
import io
import math
import os
import subprocess
import sys
import time

import torch
from torch.distributed import barrier

from checkpoints import load_checkpoint
from data.common import check_tokens, load_meta, resolve_data_dir
from model import ATTENTIONS, GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig)]
# not restored on resume: where and how this machine runs it
MACHINE_KEYS = ('out_dir', 'init_from', 'overwrite', 'eval_only', 'device', 'dtype', 'compile')


# -----------------------------------------------------------------------------------------------------------
# The rules of a run

def check_settings(cfg):
    """One line for a setting no run could use (a NaN learning rate, a batch of 0, ...)."""
    positive = ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'eval_interval', 'eval_iters',
                'log_interval', 'gradient_accumulation_steps')
    if cfg.vocab_size < 0:
        raise SystemExit(f"--vocab_size={cfg.vocab_size} must be >= 0 (0 = the dataset's)")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key}={getattr(cfg, key)} must be at least 1")
    for key in ('learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'beta1', 'beta2', 'dropout'):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0:
            raise SystemExit(f"--{key}={value} must be a finite number >= 0")
    if cfg.learning_rate == 0:
        raise SystemExit("--learning_rate=0 would not train; give a positive rate like 1e-3")
    if not (0 <= cfg.dropout < 1 and cfg.beta1 < 1 and cfg.beta2 < 1):
        raise SystemExit("--dropout, --beta1 and --beta2 must be below 1")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0 or cfg.lr_decay_iters < 0:
        raise SystemExit("--max_iters, --warmup_iters and --lr_decay_iters must be >= 0")
    if cfg.min_lr > cfg.learning_rate:
        raise SystemExit(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}: the schedule decays "
                         f"from learning_rate down to min_lr")
    if not 0 <= cfg.seed < 2 ** 63:
        raise SystemExit(f"--seed={cfg.seed} must be >= 0 and below 2**63 (torch.manual_seed's range)")
    if cfg.vocab_size > 2 ** 16:
        raise SystemExit(f"--vocab_size={cfg.vocab_size}: token ids are stored as uint16, so at most 65536")
    problem = ATTENTIONS[cfg.attention].training_problem(cfg) if cfg.attention in ATTENTIONS else ''
    if problem:  # what the attention knows would not train (an unknown name is GPTConfig's error)
        raise SystemExit(problem)
    if not cfg.out_dir:
        raise SystemExit("--out_dir is empty: give the folder the run's checkpoint goes to")


def claim_out_dir(cfg):
    """Create out_dir and lock it for this run: a second run into the same folder stops with one line, instead of
    both writing ckpt.pt. A new run never replaces another run's checkpoint unless told to (--overwrite=True).
    The lock (fcntl, on train.lock) belongs to this process: the OS drops it however the process ends."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock = open(os.path.join(cfg.out_dir, 'train.lock'), 'a')
    except OSError as e:
        raise SystemExit(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror})") from None
    try:
        import fcntl  # POSIX only; elsewhere runs are not locked
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        raise SystemExit(f"another run is training in --out_dir={cfg.out_dir} (it holds train.lock): wait for it "
                         f"to end, or give this run another --out_dir") from None
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if cfg.init_from != 'resume' and os.path.exists(path) and not cfg.overwrite:
        raise SystemExit(f"{path} holds another run: continue it with --init_from=resume, give a new --out_dir, "
                         f"or replace it with --overwrite=True")
    return lock


DIVERGED_BY = 1.0  # nats: a validation loss this far above the run's reference means the run diverged


def stop_if_diverged(losses, iter_num, out_dir, reference=None):
    """Stop before a checkpoint is written, so out_dir/ckpt.pt keeps the last good state, when a loss is no longer a
    finite number, or when the validation loss is more than DIVERGED_BY nats (a factor e of perplexity) above the
    reference: the first validation loss this process measured, or the resumed checkpoint's best."""
    bad = [f'{split} loss {value}' for split, value in losses.items() if not math.isfinite(value)]
    if not bad and reference is not None and losses.get('val', -math.inf) > reference + DIVERGED_BY:
        bad = [f"val loss {losses['val']:.4g}, more than {DIVERGED_BY:g} above {reference:.4f} where the run stood"]
    if bad:
        path = os.path.join(out_dir, 'ckpt.pt')
        kept = f'{path} keeps the last good state' if os.path.exists(path) else 'no checkpoint was written'
        raise SystemExit(f"step {iter_num}: {', '.join(bad)}: the run diverged; {kept}. Lower --learning_rate, or "
                         f"undo the flag that made the numbers blow up")


def note_other_attentions_flags(cfg, given):
    """A line for each flag that only another attention reads (--memory_read with --attention=causal): the run
    goes on, and says it ignores them."""
    own = set(getattr(ATTENTIONS.get(cfg.attention), 'own_fields', ()))
    for name, attention in ATTENTIONS.items():
        ignored = sorted((set(getattr(attention, 'own_fields', ())) - own) & set(given))
        if ignored and name != cfg.attention:
            print(f"note: {', '.join('--' + k for k in ignored)} only change attention={name}; "
                  f"attention={cfg.attention} ignores them")
            own |= set(ignored)  # one note per flag


def check_schedule(cfg):
    """One line for a learning-rate schedule that would train wrongly without a word, once a resumed run's own
    settings are back: a run that is all warm-up, or a resume whose schedule ended inside its warm-up (the rate
    would drop 20-fold at once)."""
    if not cfg.decay_lr or cfg.eval_only:
        return
    if 0 < cfg.max_iters <= cfg.warmup_iters:
        raise SystemExit(f"--max_iters={cfg.max_iters} is not longer than --warmup_iters={cfg.warmup_iters}: the "
                         f"whole run would be warm-up; give --warmup_iters below {cfg.max_iters}")
    if 0 < cfg.lr_decay_iters <= cfg.warmup_iters:
        raise SystemExit(f"the schedule ends at iteration {cfg.lr_decay_iters} (--lr_decay_iters), inside the "
                         f"warm-up of {cfg.warmup_iters}: the learning rate would drop to --min_lr at once; give "
                         f"--lr_decay_iters={cfg.max_iters} to decay over the whole run")


def data_dir_of(cfg, given):
    """The data folder: --data_dir as given; else a resumed run's own (stored relative to the repository, so a
    clone at another path finds its own copy); else data/<dataset>."""
    if 'data_dir' in given:
        return os.path.abspath(cfg.data_dir)
    return resolve_data_dir(cfg.data_dir if cfg.init_from == 'resume' else '', cfg.dataset)


def prepare_data(cfg, master_process):
    """Check data_dir holds a prepared dataset; prepare the default one on first use."""
    files = [os.path.join(cfg.data_dir, name) for name in ('train.bin', 'val.bin', 'meta.pkl')]
    if all(os.path.isfile(f) for f in files):
        return
    if os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
        raise SystemExit(f"--data_dir={cfg.data_dir} is a file, not the folder of a prepared dataset")
    prepare = os.path.join(ROOT, 'data', cfg.dataset, 'prepare.py')
    default_dir = os.path.abspath(cfg.data_dir) == os.path.join(ROOT, 'data', cfg.dataset)
    if cfg.dataset != 'python_stdlib' or not default_dir:
        hint = (f"run: python {os.path.relpath(prepare)} --out_dir={cfg.data_dir}" if os.path.isfile(prepare)
                else "prepare it first (python data/<name>/prepare.py --out_dir=...)")
        raise SystemExit(f"no prepared dataset in {cfg.data_dir} (train.bin, val.bin, meta.pkl): {hint}")
    if master_process:
        print(f"preparing the default dataset once: python {os.path.relpath(prepare)}")
        if subprocess.run([sys.executable, prepare]).returncode != 0:
            raise SystemExit(f"python {os.path.relpath(prepare)} failed (see above)")


def model_args_from(checkpoint, cfg, given, fine_tune):
    """The checkpoint's model arguments with the flags allowed to change: dropout and use_kernels always;
    when fine-tuning, block_size (context extension) and Infini's feature_scale, memory_boost and read_norm (a model
    trained with the paper's memory, then taught a sharper one). A flag that contradicts the checkpoint otherwise
    is an error."""
    args = {k: v for k, v in checkpoint['model_args'].items() if k in MODEL_KEYS}
    changeable = ('dropout', 'use_kernels') + (('block_size', 'feature_scale', 'memory_boost', 'read_norm')
                                               if fine_tune else ())
    # the model as it was built: a field newer than the checkpoint at its default, derived ones (head_size) filled in
    saved = GPTConfig(**args)
    for key in MODEL_KEYS:
        value = getattr(cfg, key)
        before = getattr(saved, key)
        if key not in given or before == value:
            continue
        if key not in changeable:
            hint = (f"to change the context, fine-tune: --init_from={os.path.join(cfg.out_dir, 'ckpt.pt')} "
                    f"--block_size={value} --out_dir=NEW" if key == 'block_size' else "drop the flag")
            raise SystemExit(f"--{key}={value} contradicts the checkpoint's {key}={before!r}; {hint}")
        args[key] = value
    return args


def checkpoint_to_start_from(cfg, given):
    """The checkpoint to resume or fine-tune from (None from scratch). A resumed run takes its settings back
    from the checkpoint, except the flags given now and the machine's own (device, dtype, compile, ...)."""
    if cfg.init_from == 'scratch':
        return None
    from tools.gpt2 import gpt2_checkpoint, is_gpt2  # here: only a run that starts from GPT-2 needs it
    if cfg.init_from != 'resume' and is_gpt2(cfg.init_from):  # GPT-2's weights in this run's attention
        return gpt2_checkpoint(cfg.init_from, **{k: getattr(cfg, k) for k in MODEL_KEYS})
    if cfg.init_from != 'resume':
        if not os.path.isfile(cfg.init_from):
            hint = (f"; did you mean {os.path.join(cfg.init_from, 'ckpt.pt')}?" if os.path.isdir(cfg.init_from)
                    else "")
            raise SystemExit(f"--init_from={cfg.init_from}: no such checkpoint file; --init_from is 'scratch', "
                             f"'resume', gpt2[-medium|-large|-xl] or the path of a ckpt.pt to fine-tune from{hint}")
        if os.path.abspath(os.path.dirname(cfg.init_from)) == os.path.abspath(cfg.out_dir):
            raise SystemExit(f"--init_from={cfg.init_from} is in --out_dir={cfg.out_dir}: fine-tuning writes a new "
                             f"run, give it a new --out_dir (or continue this run with --init_from=resume)")
        return load_checkpoint(cfg.init_from)
    path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path} to resume from: train from scratch first, or set --out_dir to "
                         f"the run to resume")
    checkpoint = load_checkpoint(path)
    missing = {'optimizer', 'iter_num', 'best_val_loss', 'config'} - checkpoint.keys()
    if missing:
        raise SystemExit(f"{path} has no {', '.join(sorted(missing))} to resume a run with; fine-tune from its "
                         f"weights instead: --init_from={path} --out_dir=NEW")
    return checkpoint


def settle(cfg, given, checkpoint, master_process, ddp):
    """Every setting the run decides rather than takes from its flags, in one place, in this order: a resumed
    run's own settings and schedule, the data folder (prepared on first use), the vocabulary, and the model's
    settings from a checkpoint. Returns the dataset's meta.pkl dict and the model's arguments."""
    if cfg.init_from == 'resume':  # the run's settings come back, except the flags given now and the machine's
        for key, value in checkpoint['config'].items():
            if hasattr(cfg, key) and key not in given and key not in MACHINE_KEYS:
                setattr(cfg, key, value)
        if not cfg.lr_decay_iters and 'lr_decay_iters' not in given:  # keep the schedule the run started with
            cfg.lr_decay_iters = checkpoint['config'].get('max_iters', cfg.max_iters)
        if checkpoint['iter_num'] >= cfg.max_iters and not cfg.eval_only:
            raise SystemExit(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} is at iteration {checkpoint['iter_num']} of "
                             f"--max_iters={cfg.max_iters}: raise --max_iters to train longer (the learning rate "
                             f"keeps the run's schedule, which ends at min_lr after iteration {cfg.lr_decay_iters}; "
                             f"--lr_decay_iters=N changes that)")
    check_schedule(cfg)
    cfg.data_dir = data_dir_of(cfg, given)
    prepare_data(cfg, master_process)
    if ddp:
        barrier()  # the other processes wait for the first one to prepare the data
    meta = load_meta(cfg.data_dir)
    cfg.vocab_size = cfg.vocab_size or meta['vocab_size']
    if checkpoint is None:
        return meta, {k: getattr(cfg, k) for k in MODEL_KEYS}
    args = model_args_from(checkpoint, cfg, given, fine_tune=cfg.init_from != 'resume')
    for key, value in args.items():  # the run's settings (saved in its checkpoints) are what it trains with
        setattr(cfg, key, value)
    return meta, args


def check_data(cfg, meta, checkpoint):
    """One line for data this run cannot train on: another tokenizer than the checkpoint's, a vocabulary or a
    length that does not fit. Returns the dataset's example_len and answer_len, as get_batch takes them."""
    if checkpoint is not None and checkpoint.get('tokenizer') is None:
        raise SystemExit(f"--init_from={cfg.init_from}: the checkpoint records no tokenizer, so which data fits it is "
                         f"unknown; train.py writes one with its checkpoints")
    if checkpoint is not None and checkpoint['tokenizer'] != meta['tokenizer']:
        raise SystemExit(f"the checkpoint's tokenizer {checkpoint['tokenizer']} is not the one of "
                         f"{cfg.data_dir} ({meta['tokenizer']}): use a dataset prepared with the same tokenizer")
    if cfg.vocab_size < meta['vocab_size']:
        raise SystemExit(f"--vocab_size={cfg.vocab_size} is smaller than the dataset's {meta['vocab_size']}")
    examples = dict(example_len=meta.get('example_len', 0), answer_len=meta.get('answer_len', 0))
    example_len = examples['example_len']
    if example_len and cfg.block_size > example_len:
        raise SystemExit(f"--block_size={cfg.block_size} is longer than the {example_len}-token examples of "
                         f"{cfg.data_dir}; use --block_size={example_len} or prepare longer examples")
    if examples['answer_len'] and cfg.block_size < example_len:
        raise SystemExit(f"{cfg.data_dir} scores only the answer at the end of each {example_len}-token example: "
                         f"use --block_size={example_len}")
    for split in ('train', 'val'):
        check_tokens(os.path.join(cfg.data_dir, f'{split}.bin'), meta['vocab_size'])
        n = os.path.getsize(os.path.join(cfg.data_dir, f'{split}.bin')) // 2
        if n <= cfg.block_size:
            raise SystemExit(f"{split}.bin in {cfg.data_dir} has {n} tokens, too few for "
                             f"--block_size={cfg.block_size}")
        if example_len and n < example_len:
            raise SystemExit(f"{split}.bin in {cfg.data_dir} has {n} tokens, fewer than one {example_len}-token "
                             f"example (meta.pkl's example_len): prepare the dataset again")
    return examples


def build_model(cfg, checkpoint, args):
    """The GPT this run trains, of the model arguments settle() decided: new, or the checkpoint's weights in the
    checkpoint's shape, then resized to cfg.block_size."""
    try:
        if checkpoint is None:
            return GPT(GPTConfig(**args))
        # build at the checkpoint's block_size, load, then resize (tiles the position table to extend)
        model = GPT(GPTConfig(**{**args, 'block_size': checkpoint['model_args']['block_size']}))
        model.load_state_dict(checkpoint['model'])
        model.resize_block_size(cfg.block_size)
        return model
    except ValueError as e:
        raise SystemExit(str(e)) from None
    except RuntimeError as e:  # load_state_dict: weights saved by another version of the code
        raise SystemExit(f"the checkpoint's weights do not fit the model its settings build "
                         f"({str(e).splitlines()[0]}); was it written by another version of model.py?") from None



# -----------------------------------------------------------------------------------------------------------
# The numbers a run writes

COLUMNS = ('iter', 'tokens', 'time_s', 'lr', 'loss', 'tokens_per_s', 'mfu', 'train_loss', 'val_loss')


def log_path(folder):
    """out_dir/log.csv, or the path itself when it is a file."""
    return folder if os.path.isfile(folder) else os.path.join(folder, 'log.csv')


def read_log(folder):
    """The rows of a run's log.csv as dicts of floats (None for an empty cell). A last line cut off by a kill
    is left out."""
    path = log_path(folder)
    if not os.path.isfile(path):
        raise SystemExit(f"no {path}: train.py writes it; is '{folder}' a run's out_dir?")
    try:
        with open(path, newline='') as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SystemExit(f"{path} is not a train.py log (it is not text)") from None
    if not text.endswith('\n'):
        text = text[:text.rfind('\n') + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            rows.append({k: float(v) if v else None for k, v in row.items() if k is not None})
        except ValueError as e:
            raise SystemExit(f"{path} is not a train.py log ({e})") from None
    return rows


@torch.no_grad()
def attention_stats(model, x):
    """{'L<i>.<name>': value} of every layer whose attention has log_stats, run on the token ids x (B, T)."""
    inputs = {}
    blocks = [(i, block.attn) for i, block in enumerate(model.transformer.h) if hasattr(block.attn, 'log_stats')]
    if not blocks:
        return {}
    # each attention's input (after ln_1) is caught on its way in, so the stats see what the layer saw
    hooks = [attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0])) for i, attn in blocks]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {f'L{i}.{name}': value for i, attn in blocks for name, value in attn.log_stats(inputs[i]).items()}


def stats_line(stats):
    """The stats as one short line for the terminal: 'L0 gate0=0.50 gate1=0.49, L1 ...'."""
    layers = {}
    for key, value in stats.items():
        layer, name = key.split('.', 1)
        layers.setdefault(layer, []).append(f'{name}={value:.3g}')
    return ', '.join(f"{layer} {' '.join(parts)}" for layer, parts in layers.items())


def start_wandb(project, run_name, config):
    """A Weights & Biases run, or a one-line error when wandb is not installed. WANDB_MODE=offline keeps it local."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb_log=True needs wandb: pip install wandb (or leave --wandb_log=False; "
                         "out_dir/log.csv has the same numbers)") from None
    return wandb.init(project=project, name=run_name, config=config)


class RunLog:
    """out_dir/log.csv for one run. resume_iter: the checkpoint's iteration when resuming (None starts a new file).
    stat_names: the attention's columns. wandb_run: a started Weights & Biases run that gets every row too."""

    def __init__(self, out_dir, stat_names=(), resume_iter=None, wandb_run=None):
        self.path = os.path.join(out_dir, 'log.csv')
        self.columns = list(COLUMNS) + list(stat_names)
        self.wandb_run = wandb_run
        kept = []
        if resume_iter is not None and os.path.isfile(self.path):
            # rows past the checkpoint are retrained, and its evaluation is run again: both would appear twice
            kept = [r for r in read_log(self.path)
                    if r.get('iter') is not None and (r['iter'] < resume_iter or
                                                      (r['iter'] == resume_iter and r.get('val_loss') is None))]
        self.time_offset = max((r['time_s'] for r in kept if r.get('time_s') is not None), default=0.0)
        self.start = time.time()
        tmp = self.path + '.tmp'  # a kill while rewriting keeps the old file
        try:
            with open(tmp, 'w', newline='') as f:
                f.write(self.line(dict(zip(self.columns, self.columns))))
                for row in kept:
                    f.write(self.line(row))
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk, a read-only folder: no half-written temp file stays behind
            if os.path.exists(tmp):
                os.remove(tmp)
            raise SystemExit(f"cannot write {self.path} ({e.strerror or e})") from None

    def line(self, row):
        """One CSV line of a row (a dict); a column the row lacks is an empty cell."""
        out = io.StringIO()
        cells = [row.get(c) for c in self.columns]
        csv.writer(out, lineterminator='\n').writerow(
            ['' if v is None else f'{v:.6g}' if isinstance(v, float) else v for v in cells])
        return out.getvalue()

    def write(self, **row):
        """Append a row: iter and any of the other columns. time_s is filled in."""
        row['time_s'] = round(self.time_offset + time.time() - self.start, 2)
        with open(self.path, 'a', newline='') as f:
            f.write(self.line(row))  # one write of a whole line, flushed on close
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if v is not None and k != 'iter'}, step=int(row['iter']))

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
