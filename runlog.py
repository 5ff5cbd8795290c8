"""
The record of a training run: out_dir/log.csv, and the same numbers in Weights & Biases with --wandb_log=True.

train.py appends one row per log interval and one per evaluation. Columns, in this order; a cell is empty where
the row has no such number:

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
import io
import os
import time

import torch

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
    with open(path, newline='') as f:
        text = f.read()
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
        with open(tmp, 'w', newline='') as f:
            f.write(self.line(dict(zip(self.columns, self.columns))))
            for row in kept:
                f.write(self.line(row))
        os.replace(tmp, self.path)

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
