"""
What the scripts share: --key=value flags, the device and its dtype, and checkpoints.

Flags work as in nanoGPT's configurator: every plain global at the top of a script (a bool, int, float or str)
is a flag, its value the default. `configure(argv, flags_of(globals()))` applies files of flags (python files of
assignments, given without --) and then --key=value flags, keeping each flag's type, and returns the settings.
"""

import math
import os
import types
import warnings
from contextlib import nullcontext

import torch

from data.common import is_binary, tokenizer_from_meta
from model import GPT, GPTConfig


def flags_of(namespace):
    """A script's flags and their defaults: its plain globals (bool, int, float, str) not starting with '_'."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}


def parse_value(key, raw, default):
    """A flag's text as the type of its default, or a one-line error."""
    try:
        if isinstance(default, bool):
            return {'true': True, 'false': False, '1': True, '0': False}[raw.lower()]
        return type(default)(raw)
    except (KeyError, ValueError):
        raise SystemExit(f"--{key}={raw}: expected {type(default).__name__} like the default {default!r}") from None


def check_value(key, value, default, where):
    """A value set in a config file, checked against the flag's type (an int is a fine float)."""
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        raise SystemExit(f"{where} sets {key}={value!r}: expected {type(default).__name__} like the default "
                         f"{default!r}")
    return value


def read_config_file(path, defaults):
    """The assignments of a file of flags, as {key: value}, each checked against its default."""
    if not os.path.isfile(path):
        raise SystemExit(f"no config file '{path}' (flags are written --key=value)")
    namespace = {}
    with open(path) as f:
        source = f.read()
    try:
        exec(source, namespace)
    except Exception as e:
        raise SystemExit(f"{path} does not run: {type(e).__name__}: {e}") from None
    values = {}
    for key, value in namespace.items():
        if key.startswith('_') or isinstance(value, types.ModuleType):
            continue
        if key not in defaults:
            raise SystemExit(f"{path} sets unknown key '{key}'; --help lists the flags")
        values[key] = check_value(key, value, defaults[key], path)
    return values


def configure(argv, defaults, doc=''):
    """Files of flags, then --key=value flags, applied to defaults ({flag: default value}).

    Returns (settings, given): settings has every flag as an attribute, given is the set of flags set by argv.
    --help prints doc and the flags with their defaults."""
    settings, given = dict(defaults), set()
    for arg in argv:
        if arg in ('-h', '--help'):
            print(doc.strip() + '\n\nflags and their defaults:')
            print('\n'.join(f'  --{k}={v!r}' for k, v in defaults.items()))
            raise SystemExit(0)
        if not arg.startswith('--'):
            values = read_config_file(arg, defaults)
        else:
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"flags are written --key=value, got '{arg}'")
            if key not in defaults:
                raise SystemExit(f"unknown flag --{key}; --help lists the flags")
            values = {key: parse_value(key, raw, defaults[key])}
        settings.update(values)
        given.update(values)
    return types.SimpleNamespace(**settings), given


def encode_prompt(start, tok):
    """The token ids of a --start flag: the text itself, or a file's text when it reads FILE:path."""
    prompt = start
    if start.startswith('FILE:'):
        path = start[len('FILE:'):]
        if not os.path.isfile(path):
            what = 'is a folder, not a file' if os.path.isdir(path) else 'no such file'
            raise SystemExit(f"--start=FILE:{path}: {what}")
        if is_binary(path):
            raise SystemExit(f"--start=FILE:{path} is a binary file (it holds NUL bytes), not text")
        with open(path, encoding='utf-8', errors='replace') as f:
            prompt = f.read()
    try:
        ids = tok.encode(prompt)
    except ValueError as e:  # a character the char-level vocabulary lacks
        raise SystemExit(str(e)) from None
    if not ids:
        raise SystemExit("--start is empty: give at least one character to start from")
    return ids


def check_sampling(temperature, top_k, max_new_tokens):
    """One line for sampling settings no generation could use."""
    if not math.isfinite(temperature) or temperature < 0:
        raise SystemExit(f"--temperature={temperature} must be a finite number >= 0 (0 is greedy decoding)")
    if top_k < 0 or max_new_tokens < 0:
        raise SystemExit("--top_k and --max_new_tokens must be >= 0 (top_k 0 keeps every token)")


# -----------------------------------------------------------------------------------------------------------
# Devices

def default_device():
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def device_type_of(device):
    """'cuda', 'mps' or 'cpu' for a --device flag; a one-line error for a device torch does not know or cannot
    see."""
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError):
        device_type = None
    if device_type not in ('cuda', 'mps', 'cpu'):
        raise SystemExit(f"--device={device}: use cpu, cuda, cuda:N or mps")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device={device} but torch sees no CUDA GPU; use --device=cpu")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit(f"--device={device} but this machine has no Apple GPU (MPS); use --device=cpu")
    return device_type


def resolve_dtype(dtype, device_type):
    """The --dtype flag's name, '' meaning: bfloat16 on CUDA where the GPU has it natively, else float16 there;
    float32 elsewhere."""
    if not dtype:
        if device_type != 'cuda':
            return 'float32'
        return 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"--dtype={dtype}: use float32, bfloat16 or float16")
    return dtype


def autocast(device_type, dtype):
    """Mixed precision for a dtype name: none in float32."""
    return nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------------------------------------
# Checkpoints

def load_checkpoint(path):
    """A checkpoint dict (its tensors on the CPU, whatever device wrote them), or a one-line error saying why it
    cannot be read."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before failing on it: the error says it
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        reason = ('' if isinstance(checkpoint, dict) and {'model', 'model_args'} <= checkpoint.keys()
                  and isinstance(checkpoint['model_args'], dict) else "no 'model' and 'model_args' in it")
    except PermissionError:
        raise SystemExit(f"cannot read {path}: permission denied") from None
    except Exception:  # torch's messages here (a paragraph on weights_only, a zip reader's, an IndexError) say little
        reason = 'not a complete torch.save file of tensors and plain values'
    if reason:
        raise SystemExit(f"{path} is not a readable checkpoint ({reason}); it may be truncated or from another "
                         f"program: train again or point at another file")
    if not isinstance(checkpoint['model'], dict):
        raise SystemExit(f"{path} is not a readable checkpoint (its 'model' is not a state_dict)")
    if not all(torch.isfinite(t).all() for t in checkpoint['model'].values() if torch.is_floating_point(t)):
        raise SystemExit(f"{path} holds NaN or infinite weights: the run that wrote it diverged; train again with "
                         f"a lower --learning_rate")
    # checkpoints written before GPTConfig had a positions field all used GPT-2's learned table
    checkpoint['model_args'].setdefault('positions', 'learned')
    # a compiled model's state_dict names its weights _orig_mod.*
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    return checkpoint


def load_model(path, device='cpu', **overrides):
    """The eval-mode GPT of a checkpoint on device, and the checkpoint dict. overrides change model settings that
    do not touch the weights (use_kernels, dropout)."""
    checkpoint = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**{**checkpoint['model_args'], **overrides}))
        model.load_state_dict(checkpoint['model'])
    except (TypeError, ValueError, RuntimeError) as e:  # settings or weights from another version of model.py
        raise SystemExit(f"cannot build the model of {path} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    return model.to(device).eval(), checkpoint


def checkpoint_tokenizer(checkpoint, path):
    """The tokenizer a checkpoint records (train.py saves it), or a one-line error when it records none."""
    try:
        return tokenizer_from_meta(checkpoint['tokenizer'])
    except (KeyError, TypeError, AttributeError, ValueError):
        raise SystemExit(f"{path} records no tokenizer train.py knows, so its token ids cannot become text; "
                         f"was it written by train.py?") from None


def save_checkpoint(checkpoint, path):
    """Write to a temp file in the same folder, fsync, then rename over path: the rename is atomic, so a run
    killed mid-write leaves the previous checkpoint whole."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a folder gone: the previous checkpoint is still whole
        raise SystemExit(f"cannot write {path} ({e.strerror or e}); the checkpoint there before, if any, is "
                         f"untouched") from None
