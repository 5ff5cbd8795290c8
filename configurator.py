"""
The scripts' flags: --key=value, as in nanoGPT's configurator. It imports neither torch nor the model, so reading
a flag is quick; devices.py and checkpoints.py hold what the scripts share besides.

Flags work as in nanoGPT's configurator: every plain global at the top of a script (a bool, int, float or str)
is a flag, its value the default. `configure(argv, flags_of(globals()))` applies files of flags (python files of
assignments, given without --) and then --key=value flags, keeping each flag's type, and returns the settings.
"""

import math
import os
import types


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


def parse_ints(flag, text, example='1024,4k,1M'):
    """A flag's comma-separated ints, k and M suffixes allowed: '128,1k,1M' -> [128, 1024, 1048576]."""
    scale = {'k': 2 ** 10, 'm': 2 ** 20}
    try:
        return [int(n[:-1]) * scale[n[-1].lower()] if n[-1].lower() in scale else int(n)
                for n in text.replace(' ', '').split(',') if n]
    except ValueError:
        raise SystemExit(f"--{flag} is a comma-separated list of integers like {example}, not '{text}'") from None


def check_sampling(temperature, top_k, max_new_tokens):
    """One line for sampling settings no generation could use."""
    if not math.isfinite(temperature) or temperature < 0:
        raise SystemExit(f"--temperature={temperature} must be a finite number >= 0 (0 is greedy decoding)")
    if top_k < 0 or max_new_tokens < 0:
        raise SystemExit("--top_k and --max_new_tokens must be >= 0 (top_k 0 keeps every token)")


def inference_options(model, budget, evict='F'):
    """The attention options of the --budget and --evict flags, {} when both are at their defaults ('', 'F'):
    budget an int or one per layer. The model's cache checks them: a one-line error for an attention that takes no
    budget, a budget below 2 or an unknown eviction rule."""
    if evict != 'F' and not budget:
        raise SystemExit(f"--evict={evict} chooses what a pruned cache drops; it needs --budget=N (selective only)")
    options = {}
    if budget:
        values = parse_ints('budget', budget, '32 or 8,16,16,8 (one per layer)')
        options['budget'] = values[0] if len(values) == 1 else values
    if budget or evict != 'F':
        options['evict'] = evict
    try:
        model.new_cache(1, **options)  # allocates nothing: a cache checks its options when it is made
    except ValueError as e:
        flags = ' '.join(f'--{key}={value}' for key, value in (('budget', budget), ('evict', evict))
                         if key in options and (key != 'evict' or value != 'F'))
        raise SystemExit(f"{flags}: {e}") from None
    return options
