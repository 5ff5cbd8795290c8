"""
Flags, as in nanoGPT's configurator: every plain global (bool, int, float, str) at the top of a script is a flag,
its value the default. configure() applies files of flags (python files of assignments, given without --), then
--key=value flags, keeping each flag's type. It imports neither torch nor the model, so reading flags is quick.
"""

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


def read_config_file(path, defaults):
    """The assignments of a file of flags, as {key: value}, each checked against its default."""
    if not os.path.isfile(path):
        raise SystemExit(f"no config file '{path}' (flags are written --key=value)")
    namespace = {}
    try:
        with open(path) as f:
            exec(f.read(), namespace)
    except Exception as e:
        raise SystemExit(f"{path} does not run: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}
    for key, value in values.items():
        if key not in defaults:
            raise SystemExit(f"{path} sets unknown key '{key}'; --help lists the flags")
        if isinstance(defaults[key], float) and type(value) is int:  # an int is a fine float
            values[key] = float(value)
        elif type(value) is not type(defaults[key]):
            raise SystemExit(f"{path} sets {key}={value!r}: expected {type(defaults[key]).__name__} like the "
                             f"default {defaults[key]!r}")
    return values


def configure(argv, defaults, doc=''):
    """Files of flags, then --key=value flags, applied to defaults ({flag: default}): (settings, the set of flags
    argv set). --help prints doc and the flags with their defaults."""
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
