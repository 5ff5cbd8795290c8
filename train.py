"""
Train a GPT, nanoGPT style. Every global below is a flag, and so is every field of GPTConfig (model.py):

  python train.py                                    # a small model on the Python stdlib source, sized for the device
  python train.py --attention=selective --n_layer=6  # flags override defaults
  python train.py config/train_stdlib_gpu.py --max_iters=2000   # a file of flags first, then flags
  python train.py --init_from=resume                 # continue out_dir/ckpt.pt: same LR schedule, same batches
  python train.py --init_from=out-in/ckpt.pt --block_size=1024 --out_dir=out-in-long   # fine-tune, e.g. longer context

Several GPUs with DDP:  torchrun --standalone --nproc_per_node=8 train.py --gradient_accumulation_steps=8
"""

import dataclasses
import math
import os
import subprocess
import sys
import time
import types
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import barrier, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.common import load_meta
from model import GPT, GPTConfig

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
init_from = 'scratch'           # 'scratch', 'resume' (out_dir/ckpt.pt) or a path to another run's ckpt.pt (fine-tune)
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
device = 'cuda' if _gpu else 'mps' if torch.backends.mps.is_available() else 'cpu'
dtype = ''                      # '' = bfloat16 on CUDA where supported, else float16; float32 elsewhere
compile = _gpu                  # torch.compile the model
seed = 1337
for _f in dataclasses.fields(GPTConfig):
    globals().setdefault(_f.name, _f.default)
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))]
model_keys = [f.name for f in dataclasses.fields(GPTConfig)]
MACHINE_KEYS = ('out_dir', 'init_from', 'eval_only', 'device', 'dtype', 'compile')  # not restored on resume
example_len = None  # not a flag: from the dataset's meta.pkl, the length of its examples if it has any
ROOT = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------------------------------------


def parse_value(key, raw, default):
    """A flag's text as the type of its default, or a one-line error."""
    try:
        if isinstance(default, bool):
            return {'true': True, 'false': False, '1': True, '0': False}[raw.lower()]
        return type(default)(raw)
    except (KeyError, ValueError):
        raise SystemExit(f"--{key}={raw}: expected {type(default).__name__} like the default {default!r}") from None


def check_value(key, value, default, where):
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        raise SystemExit(f"{where} sets {key}={value!r}: expected {type(default).__name__} like the default "
                         f"{default!r}")
    return value


def configure(argv, config, keys):
    """nanoGPT's configurator: apply files of flags (arguments without --) then --key=value flags to config, a
    dict of defaults (a script's globals) whose keys `keys` are flags, keeping each one's type. Returns the set
    of keys given."""
    given = set()
    for arg in argv:
        if arg in ('-h', '--help'):
            print(config['__doc__'].strip() + '\n\nflags and their defaults:')
            print('\n'.join(f'  --{k}={config[k]!r}' for k in keys))
            raise SystemExit(0)
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise SystemExit(f"no config file '{arg}' (flags are written --key=value)")
            namespace = {}
            with open(arg) as f:
                source = f.read()
            try:
                exec(source, namespace)
            except Exception as e:
                raise SystemExit(f"{arg} does not run: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                if key not in keys:
                    raise SystemExit(f"{arg} sets unknown key '{key}'; the flags are the globals at the top of "
                                     f"{os.path.basename(config['__file__'])}")
                config[key] = check_value(key, value, config[key], arg)
                given.add(key)
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            raise SystemExit(f"flags are written --key=value, got '{arg}'")
        if key not in keys:
            raise SystemExit(f"unknown flag --{key}; the flags are the globals at the top of "
                             f"{os.path.basename(config['__file__'])}")
        config[key] = parse_value(key, raw, config[key])
        given.add(key)
    return given


def load_checkpoint(path):
    """A checkpoint dict (its tensors on the CPU, whatever device wrote them), or a one-line error saying why it
    cannot be read."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        reason = ('' if isinstance(checkpoint, dict) and {'model', 'model_args'} <= checkpoint.keys() else
                  "no 'model' and 'model_args' in it")
    except PermissionError:
        raise SystemExit(f"cannot read {path}: permission denied") from None
    except Exception:  # torch's messages here (a paragraph on weights_only, a zip reader's, an IndexError) say little
        reason = 'not a complete torch.save file of tensors and plain values'
    if reason:
        raise SystemExit(f"{path} is not a readable checkpoint ({reason}); it may be truncated or from another "
                         f"program: train again or point at another file")
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    return checkpoint


def save_checkpoint(checkpoint, path):
    """Write to a temp file in the same folder, fsync, then rename over path: the rename is atomic, so a run
    killed mid-write leaves the previous checkpoint whole."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def get_batch(split, rng, device):
    """batch_size windows of block_size tokens and their next tokens, drawn with rng (a numpy Generator)."""
    # recreate the memmap every batch to avoid a memory leak, as nanoGPT does
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    if example_len:  # examples back to back (passkey): windows start at an example and targets stay inside it
        ix = rng.integers(0, len(data) // example_len, size=batch_size) * example_len
        n_targets = min(block_size, example_len - 1)
    else:
        ix = rng.integers(0, len(data) - block_size, size=batch_size)
        n_targets = block_size
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.full((batch_size, block_size), -1, dtype=torch.int64)  # -1: no target (ignored by the loss)
    for row, i in enumerate(ix):
        y[row, :n_targets] = torch.from_numpy(data[i + 1:i + 1 + n_targets].astype(np.int64))
    if 'cuda' in device:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters (0 = max_iters)."""
    decay_iters = lr_decay_iters or max_iters
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss(model, ctx, device):
    """Mean loss over eval_iters batches of each split; the same batches at every eval, so evals compare."""
    out = {}
    model.eval()
    for split_id, split in enumerate(('train', 'val')):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, np.random.default_rng([seed, 1, split_id, k]), device)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def extra_log(model):
    """A short line of what the model, or else its attentions, report about themselves (e.g. gate values)."""
    if hasattr(model, 'extra_log'):
        return model.extra_log()
    return ' '.join(f'L{i}: {block.attn.extra_log()}' for i, block in enumerate(model.transformer.h)
                    if hasattr(block.attn, 'extra_log'))


def prepare_data(master_process):
    """Check data_dir holds a prepared dataset; prepare the default one on first use."""
    files = [os.path.join(data_dir, name) for name in ('train.bin', 'val.bin', 'meta.pkl')]
    if all(os.path.isfile(f) for f in files):
        return
    prepare = os.path.join(ROOT, 'data', dataset, 'prepare.py')
    default_dir = os.path.abspath(data_dir) == os.path.join(ROOT, 'data', dataset)
    if dataset != 'python_stdlib' or not default_dir:
        hint = f"run: python {os.path.relpath(prepare)}" if os.path.isfile(prepare) else "prepare it first"
        raise SystemExit(f"no prepared dataset in {data_dir} (train.bin, val.bin, meta.pkl): {hint}")
    if master_process:
        print(f"preparing the default dataset once: python {os.path.relpath(prepare)}")
        if subprocess.run([sys.executable, prepare]).returncode != 0:
            raise SystemExit(f"python {os.path.relpath(prepare)} failed (see above)")


def model_args_from(checkpoint, given, fine_tune):
    """The checkpoint's model arguments with the flags allowed to change: dropout and use_kernels always,
    block_size when fine-tuning (context extension). A flag given that contradicts the checkpoint is an error."""
    args = {k: v for k, v in checkpoint['model_args'].items() if k in model_keys}
    changeable = ('dropout', 'use_kernels') + (('block_size',) if fine_tune else ())
    for key in model_keys:
        value = globals()[key]
        if key not in given or key not in args or args[key] == value:
            continue
        if key not in changeable:
            hint = (f"to change the context, fine-tune: --init_from={os.path.join(out_dir, 'ckpt.pt')} "
                    f"--block_size={value} --out_dir=NEW" if key == 'block_size' else "drop the flag")
            raise SystemExit(f"--{key}={value} contradicts the checkpoint's {key}={args[key]!r}; {hint}")
        args[key] = value
    return args


def main(argv):
    given = configure(argv, globals(), config_keys)

    # DDP (torchrun sets RANK): one process per GPU, or per CPU process with gloo
    ddp = int(os.environ.get('RANK', -1)) != -1
    run_device = device
    accum_steps = gradient_accumulation_steps
    rank, world_size = 0, 1
    if ddp:
        init_process_group(backend='nccl' if 'cuda' in device else 'gloo')
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if 'cuda' in device:
            run_device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(run_device)
        if accum_steps % world_size != 0:
            raise SystemExit(f"--gradient_accumulation_steps={accum_steps} must be a multiple of the "
                             f"{world_size} processes")
        accum_steps //= world_size
    master_process = rank == 0
    device_type = 'cuda' if 'cuda' in run_device else 'mps' if 'mps' in run_device else 'cpu'
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device={device} but torch sees no CUDA GPU; use --device=cpu")

    # the run to continue or fine-tune from; a resumed run keeps its settings except those given now
    checkpoint = None
    if init_from == 'resume':
        ckpt_path = os.path.join(out_dir, 'ckpt.pt')
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"no checkpoint at {ckpt_path} to resume from: train from scratch first, or set "
                             f"--out_dir to the run to resume")
        checkpoint = load_checkpoint(ckpt_path)
        missing = {'optimizer', 'iter_num', 'best_val_loss', 'config'} - checkpoint.keys()
        if missing:
            raise SystemExit(f"{ckpt_path} has no {', '.join(sorted(missing))} to resume a run with; fine-tune "
                             f"from its weights instead: --init_from={ckpt_path} --out_dir=NEW")
        globals().update({k: v for k, v in checkpoint['config'].items()
                          if k in config_keys and k not in given and k not in MACHINE_KEYS})
        if checkpoint['iter_num'] >= max_iters and not eval_only:
            raise SystemExit(f"{ckpt_path} is at iteration {checkpoint['iter_num']} of --max_iters={max_iters}: "
                             f"raise --max_iters to train longer")
    elif init_from != 'scratch':
        checkpoint = load_checkpoint(init_from)
        if os.path.abspath(os.path.dirname(init_from)) == os.path.abspath(out_dir):
            raise SystemExit(f"--init_from={init_from} is in --out_dir={out_dir}: fine-tuning writes a new run, "
                             f"give it a new --out_dir (or continue this run with --init_from=resume)")

    # data
    globals()['data_dir'] = data_dir or os.path.join(ROOT, 'data', dataset)
    prepare_data(master_process)
    if ddp:
        barrier()
    meta = load_meta(data_dir)

    # model settings: this run's flags from scratch, else the checkpoint's with the changes allowed
    if checkpoint is None:
        args = {k: globals()[k] for k in model_keys}
        args['vocab_size'] = vocab_size or meta['vocab_size']
        iter_num, best_val_loss = 0, 1e9
    else:
        if checkpoint.get('tokenizer') != meta['tokenizer']:
            raise SystemExit(f"the checkpoint's tokenizer {checkpoint.get('tokenizer')} is not the one of "
                             f"{data_dir} ({meta['tokenizer']}): use a dataset prepared with the same tokenizer")
        args = model_args_from(checkpoint, given, fine_tune=init_from != 'resume')
        resumed = init_from == 'resume'
        iter_num = checkpoint['iter_num'] if resumed else 0
        best_val_loss = checkpoint['best_val_loss'] if resumed else 1e9
    globals().update(args)  # so the run's config (saved in its checkpoints) holds the settings it trains with
    if vocab_size < meta['vocab_size']:
        raise SystemExit(f"--vocab_size={vocab_size} is smaller than the dataset's {meta['vocab_size']}")
    globals()['example_len'] = meta.get('example_len', 0)
    if example_len and block_size > example_len:
        raise SystemExit(f"--block_size={block_size} is longer than the {example_len}-token examples of "
                         f"{data_dir}; use --block_size={example_len} or prepare longer examples")
    for split in ('train', 'val'):
        n = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2
        if n <= block_size:
            raise SystemExit(f"{split}.bin in {data_dir} has {n} tokens, too few for --block_size={block_size}")
    torch.manual_seed(seed + rank)  # the same initial weights for the same seed (DDP copies rank 0's to all)
    try:
        config = GPTConfig(**args)
        if checkpoint is None:
            model = GPT(config)
        else:  # build at the checkpoint's block_size, load, then resize (tiles the position table to extend)
            model = GPT(dataclasses.replace(config, block_size=checkpoint['model_args']['block_size']))
            model.load_state_dict(checkpoint['model'])
            model.resize_block_size(block_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    except RuntimeError as e:  # load_state_dict: weights saved by another version of the code
        raise SystemExit(f"the checkpoint's weights do not fit the model its settings build "
                         f"({str(e).splitlines()[0]}); was it written by another version of model.py?") from None
    model.to(run_device)

    ptdtype = dtype or ('bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
                        else 'float16' if device_type == 'cuda' else 'float32')
    if ptdtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype={dtype}: use float32, bfloat16 or float16")
    if ptdtype == 'float16' and device_type != 'cuda':
        raise SystemExit("--dtype=float16 needs CUDA (a GradScaler); use --dtype=bfloat16 or float32")
    ctx = nullcontext() if ptdtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, ptdtype))
    scaler = torch.amp.GradScaler('cuda', enabled=ptdtype == 'float16')  # float16 gradients need loss scaling
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    if init_from == 'resume':
        optimizer.load_state_dict(checkpoint['optimizer'])
    checkpoint = None  # free it
    raw_model = model  # the plain module: its state_dict is what a checkpoint holds
    if compile:
        model = torch.compile(model)
    train_model = model
    if ddp:  # training goes through DDP, which syncs gradients; evaluation, on the master alone, does not
        train_model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

    tokens_per_iter = accum_steps * world_size * batch_size * block_size
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, attention={attention}, {tokens_per_iter:,} "
              f"tokens per iteration, {run_device} {ptdtype}{' compiled' if compile else ''}")
    run_config = {k: globals()[k] for k in config_keys}
    bar = tqdm(total=max_iters, initial=iter_num, disable=eval_only or not master_process, dynamic_ncols=True)
    t0, timed_iters = time.time(), 0
    while True:
        if master_process and (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only):
            losses = estimate_loss(model, ctx, run_device)
            extra = extra_log(raw_model)
            tqdm.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                       + (f", {extra}" if extra else ''))
            if iter_num > 0 and not eval_only and (losses['val'] < best_val_loss or always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses['val'])
                save_checkpoint({'model_args': dataclasses.asdict(raw_model.config), 'model': raw_model.state_dict(),
                                 'optimizer': optimizer.state_dict(), 'iter_num': iter_num,
                                 'best_val_loss': best_val_loss, 'config': run_config,
                                 'tokenizer': meta['tokenizer']}, os.path.join(out_dir, 'ckpt.pt'))
            t0, timed_iters = time.time(), 0  # tokens/s counts training only
        if iter_num >= max_iters or eval_only:
            break

        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_mult']
        for micro_step in range(accum_steps):
            # batches depend only on (seed, iter_num, rank, micro_step): a resumed run draws what this one would
            X, Y = get_batch('train', np.random.default_rng([seed, 0, iter_num, rank, micro_step]), run_device)
            if ddp:  # sync gradients on the last micro step only
                train_model.require_backward_grad_sync = micro_step == accum_steps - 1
            with ctx:
                _, loss = train_model(X, Y)
                loss = loss / accum_steps
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        timed_iters += 1
        bar.update(1)

        if iter_num % log_interval == 0 and master_process:
            t1 = time.time()
            dt = (t1 - t0) / timed_iters
            t0, timed_iters = t1, 0
            stats = {'loss': f'{loss.item() * accum_steps:.4f}', 'tok/s': f'{tokens_per_iter / dt:,.0f}'}
            if device_type == 'cuda':
                stats['mfu'] = f'{100 * raw_model.estimate_mfu(batch_size * accum_steps, dt):.1f}%'
            bar.set_postfix(stats, refresh=False)
    bar.close()
    if ddp:
        destroy_process_group()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("CUDA out of memory: lower --batch_size (raising --gradient_accumulation_steps as much keeps "
                         "the tokens per step) or --block_size") from None
