"""
Train a GPT, nanoGPT style. Every global below is a flag, and so is every field of GPTConfig (model.py):

  python train.py                                    # a small model on the Python stdlib source, sized for the device
  python train.py --attention=selective --n_layer=6  # flags override defaults
  python train.py config/train_stdlib_gpu.py --max_iters=2000   # a file of flags first, then flags
  python train.py --init_from=resume                 # continue out_dir/ckpt.pt: same LR schedule, same batches
  python train.py --init_from=out-in/ckpt.pt --block_size=1024 --out_dir=out-in-long   # fine-tune, e.g. longer context
  python train.py --init_from=gpt2 --attention=infini --dataset=pg19 --out_dir=out-gpt2-infini  # docs/gpt2.md

Several GPUs with DDP:  torchrun --standalone --nproc_per_node=8 train.py --gradient_accumulation_steps=8

Every run writes out_dir/log.csv, its numbers row by row (runs.py lists the columns); tools/curves.py plots
them.
"""

import dataclasses
import math
import os
import signal
import sys
import time
import types

if __name__ == '__main__':  # Ctrl-C while torch loads ends with one line; run_script (devices.py) takes over
    signal.signal(signal.SIGINT, lambda *_: sys.exit('interrupted while starting: nothing was written'))

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import ROPE_LAYOUT, save_checkpoint
from configurator import configure, flags_of
from data.common import stored_data_dir
from devices import autocast, default_device, device_type_of, resolve_dtype, run_script
from model import GPTConfig
from runs import (RunLog, attention_stats, build_model, check_data, check_settings, checkpoint_to_start_from,
                  claim_out_dir, note_other_attentions_flags, settle, start_wandb, stats_line, stop_if_diverged)

# -----------------------------------------------------------------------------------------------------------
# Defaults. Those that set the run's size follow the device found: a small model that trains in a few minutes
# on a CPU, a baby GPT on a GPU. Flags always win.
_gpu = torch.cuda.is_available()
# I/O
out_dir = 'out'
eval_interval = 500 if _gpu else 200
log_interval = 10
eval_iters = 100 if _gpu else 20
eval_only = False               # evaluate once and exit
always_save_checkpoint = True   # else only when val loss improves
init_from = 'scratch'           # 'scratch', 'resume', a ckpt.pt, gpt2[-medium|-large|-xl] or a folder (tools/gpt2.py)
overwrite = False               # a new run may replace the checkpoint of another run in out_dir
# logging: every run writes out_dir/log.csv (runs.py); wandb gets the same numbers
wandb_log = False               # needs `pip install wandb`; WANDB_MODE=offline keeps it on this machine
wandb_project = 'long-attention-gpt'
wandb_run_name = 'run'
# data
dataset = 'python_stdlib'
data_dir = ''                   # '' = data/<dataset>
gradient_accumulation_steps = 1
batch_size = 32 if _gpu else 8
# model: these defaults replace GPTConfig's; its other fields (attention, segment_len, ...) keep model.py's
block_size = 1024 if _gpu else 256
n_layer = 6 if _gpu else 4
n_head = 6 if _gpu else 4
n_embd = 384 if _gpu else 128
dropout = 0.0                   # 0 keeps every attention on its fused path; try 0.1 if val loss rises
vocab_size = 0                  # 0 = the dataset's
# AdamW
learning_rate = 1e-3 if _gpu else 2e-3
max_iters = 3000 if _gpu else 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0                 # 0 = off
# learning rate: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100 if _gpu else 20
lr_decay_iters = 0              # 0 = max_iters
min_lr = 1e-4
# system
device = ''                     # '' = cuda if available, else mps, else cpu (devices.default_device)
dtype = ''                      # '' = bfloat16 on CUDA where supported, else float16; float32 elsewhere
compile = _gpu                  # torch.compile the model
seed = 1337
for _field in dataclasses.fields(GPTConfig):
    globals().setdefault(_field.name, _field.default)
FLAGS = flags_of(globals())  # every setting above, with its default
# -----------------------------------------------------------------------------------------------------------


def get_batch(data_dir, split, batch_size, block_size, rng, device, example_len=0, answer_len=0):
    """batch_size windows of block_size tokens of data_dir/split.bin and their next tokens, drawn with rng (a numpy
    Generator). Targets of -1 are ignored by the loss. example_len, answer_len: the dataset's (meta.pkl), 0 = none."""
    # recreate the memmap every batch to avoid a memory leak, as nanoGPT does
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    B, T = batch_size, block_size
    y = torch.full((B, T), -1, dtype=torch.int64)
    if example_len:  # examples back to back (passkey): windows start at an example, targets stay inside it
        starts = rng.integers(0, len(data) // example_len, size=B) * example_len
        last = min(T, example_len - 1)  # targets at positions 0..last-1
        # answer_len: only the targets of the example's last answer_len tokens count (the answer of a task)
        first = example_len - 1 - answer_len if answer_len else 0
    else:
        starts = rng.integers(0, len(data) - T, size=B)
        first, last = 0, T
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in starts])
    for row, i in enumerate(starts):
        y[row, first:last] = torch.from_numpy(data[i + 1 + first:i + 1 + last].astype(np.int64))
    if 'cuda' in device:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(cfg, it):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters (0 = max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(cfg, model, ctx, device, examples):
    """Mean loss over eval_iters batches of each split; the same batches at every eval, so evals compare.
    examples: the dataset's example_len and answer_len, as get_batch takes them."""
    out = {}
    model.eval()
    for split_id, split in enumerate(('train', 'val')):
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            X, Y = get_batch(cfg.data_dir, split, cfg.batch_size, cfg.block_size,
                             np.random.default_rng([cfg.seed, 1, split_id, k]), device, **examples)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def eval_stats(cfg, model, ctx, device, examples):
    """What the attentions report about themselves (runs.py), on the first four windows of a fixed val batch."""
    X, _ = get_batch(cfg.data_dir, 'val', cfg.batch_size, cfg.block_size, np.random.default_rng([cfg.seed, 1, 1, 0]),
                     device, **examples)
    with ctx:
        return attention_stats(model, X[:4])


def open_log(cfg, model, ctx, device, examples, iter_num):
    """out_dir/log.csv for this run (continued when resuming), and a wandb run with --wandb_log=True."""
    wandb_run = None
    if cfg.wandb_log:
        wandb_run = start_wandb(cfg.wandb_project, cfg.wandb_run_name, {k: getattr(cfg, k) for k in FLAGS})
    stat_names = eval_stats(cfg, model, ctx, device, examples).keys()
    resume_iter = iter_num if cfg.init_from == 'resume' else None
    return RunLog(cfg.out_dir, stat_names, resume_iter, wandb_run)


def main(argv):
    cfg, given = configure(argv, FLAGS, __doc__)
    check_settings(cfg)

    # DDP (torchrun sets RANK): one process per GPU, or per CPU process with gloo
    ddp = int(os.environ.get('RANK', -1)) != -1
    cfg.device = cfg.device or default_device()  # the flag's '' resolved, as every script resolves it
    run_device, accum_steps, rank, world_size = cfg.device, cfg.gradient_accumulation_steps, 0, 1
    if ddp:
        init_process_group(backend='nccl' if 'cuda' in cfg.device else 'gloo')
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if 'cuda' in cfg.device:
            run_device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(run_device)
        if accum_steps % world_size != 0:
            raise SystemExit(f"--gradient_accumulation_steps={accum_steps} must be a multiple of the "
                             f"{world_size} processes")
        accum_steps //= world_size
    master_process = rank == 0
    device_type = device_type_of(run_device)

    # the run to continue or fine-tune from, then every setting the run decides itself (runs.settle)
    checkpoint = checkpoint_to_start_from(cfg, given)
    meta, model_args = settle(cfg, given, checkpoint, master_process, ddp)
    examples = check_data(cfg, meta, checkpoint)
    if master_process:
        note_other_attentions_flags(cfg, given)
        print(f"data: {cfg.data_dir}")

    # model
    torch.manual_seed(cfg.seed + rank)  # the same initial weights for the same seed (DDP copies rank 0's to all)
    model = build_model(cfg, checkpoint, model_args)
    model.to(run_device)
    ptdtype = resolve_dtype(cfg.dtype, device_type)
    if ptdtype == 'float16' and device_type != 'cuda':
        raise SystemExit("--dtype=float16 needs CUDA (a GradScaler); use --dtype=bfloat16 or float32")
    ctx = autocast(device_type, ptdtype)
    scaler = torch.amp.GradScaler('cuda', enabled=ptdtype == 'float16')  # float16 gradients need loss scaling
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    lock = claim_out_dir(cfg) if master_process and not cfg.eval_only else None

    # optimizer
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    resumed = cfg.init_from == 'resume'
    iter_num = checkpoint['iter_num'] if resumed else 0
    best_val_loss = checkpoint['best_val_loss'] if resumed else 1e9
    start_iter = iter_num  # a resumed run writes no checkpoint at its first step: its settings have trained nothing
    reference = best_val_loss if resumed else None  # where the run stood: divergence is measured from here
    if resumed:
        optimizer.load_state_dict(checkpoint['optimizer'])
    # the schedule the checkpoint's last step ran on: a resumed run's first log row records its rate, whatever
    # the flags of this run changed
    last_schedule = types.SimpleNamespace(**{**vars(cfg), **checkpoint['config']}) if resumed else cfg
    checkpoint = None  # free it
    raw_model = model  # the plain module: its state_dict is what a checkpoint holds
    if cfg.compile:
        model = torch.compile(model)
    train_model = model
    if ddp:  # training goes through DDP, which syncs gradients; evaluation, on the master alone, does not
        train_model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

    # the training loop
    tokens_per_iter = accum_steps * world_size * cfg.batch_size * cfg.block_size
    if master_process:
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, attention={cfg.attention}, {tokens_per_iter:,} "
              f"tokens per iteration, {run_device} {ptdtype}{' compiled' if cfg.compile else ''}")
    log = None
    if master_process and not cfg.eval_only:
        log = open_log(cfg, raw_model, ctx, run_device, examples, iter_num)
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=cfg.eval_only or not master_process,
               dynamic_ncols=True)
    t0, timed_iters = time.time(), 0
    while True:
        if master_process and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only):
            losses = estimate_loss(cfg, model, ctx, run_device, examples)
            stats = eval_stats(cfg, raw_model, ctx, run_device, examples)
            tqdm.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                       + (f", {stats_line(stats)}" if stats else ''))
            if log:  # the rate the last step took
                lr = get_lr(cfg if iter_num > start_iter else last_schedule, iter_num - 1) if iter_num else None
                log.write(iter=iter_num, tokens=iter_num * tokens_per_iter, train_loss=losses['train'],
                          val_loss=losses['val'], lr=lr, **stats)
            reference = losses['val'] if reference is None else reference
            stop_if_diverged(losses, iter_num, cfg.out_dir, reference)
            improved = losses['val'] < best_val_loss
            if iter_num > start_iter and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses['val'])
                save_checkpoint({'model_args': dataclasses.asdict(raw_model.config), 'model': raw_model.state_dict(),
                                 'optimizer': optimizer.state_dict(), 'iter_num': iter_num,
                                 'best_val_loss': best_val_loss,
                                 'config': {**{k: getattr(cfg, k) for k in FLAGS},
                                            'data_dir': stored_data_dir(cfg.data_dir, cfg.dataset)},
                                 'tokenizer': meta['tokenizer'], 'rope_layout': ROPE_LAYOUT},
                                os.path.join(cfg.out_dir, 'ckpt.pt'))
            t0, timed_iters = time.time(), 0  # tokens/s counts training only
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break

        lr = get_lr(cfg, iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_mult']
        for micro_step in range(accum_steps):
            # batches depend only on (seed, iter_num, rank, micro_step): a resumed run draws what this one would
            X, Y = get_batch(cfg.data_dir, 'train', cfg.batch_size, cfg.block_size,
                             np.random.default_rng([cfg.seed, 0, iter_num, rank, micro_step]), run_device, **examples)
            if ddp:  # sync gradients on the last micro step only
                train_model.require_backward_grad_sync = micro_step == accum_steps - 1
            with ctx:
                _, loss = train_model(X, Y)
                loss = loss / accum_steps
            scaler.scale(loss).backward()
        if cfg.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        timed_iters += 1
        bar.update(1)

        if iter_num % cfg.log_interval == 0 and master_process:
            stop_if_diverged({'train': loss.item()}, iter_num, cfg.out_dir)
            t1 = time.time()
            dt = (t1 - t0) / timed_iters
            t0, timed_iters = t1, 0
            lossf = loss.item() * accum_steps
            mfu = 100 * raw_model.estimate_mfu(cfg.batch_size * accum_steps, dt) if device_type == 'cuda' else None
            stats = {'loss': f'{lossf:.4f}', 'tok/s': f'{tokens_per_iter / dt:,.0f}'}
            if mfu is not None:
                stats['mfu'] = f'{mfu:.1f}%'
            bar.set_postfix(stats, refresh=False)
            log.write(iter=iter_num, tokens=iter_num * tokens_per_iter, lr=lr, loss=lossf,
                      tokens_per_s=tokens_per_iter / dt, mfu=mfu)
    bar.close()
    if log:
        log.close()
    if lock:
        lock.close()
    if ddp:
        destroy_process_group()


if __name__ == '__main__':
    try:
        run_script(main, sys.argv[1:], interrupted="interrupted: the last checkpoint written is whole; "
                                                   "--init_from=resume continues the run")
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise
        where = 'CUDA' if isinstance(e, torch.OutOfMemoryError) else 'CPU'
        raise SystemExit(f"{where} out of memory: lower --batch_size (raising --gradient_accumulation_steps as much "
                         f"keeps the tokens per step) or --block_size") from None
