"""Flags, as in nanoGPT's configurator: every plain global (bool, int, float, str) at the top of a script is a
flag, its value the default. Files of flags (python assignments) apply first, then --key=value; each keeps its type.
"""

import types


def flags_of(namespace):
    """A script's flags and their defaults: its plain globals (bool, int, float, str) not starting with '_'."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}


def parse_value(key, raw, default):
    """A flag's text as the type of its default, or a one-line error."""
    booleans = {'true': True, 'false': False, '1': True, '0': False}
    try:
        return booleans[raw.lower()] if isinstance(default, bool) else type(default)(raw)
    except (KeyError, ValueError):
        raise SystemExit(f"--{key}={raw}: expected {type(default).__name__} like the default {default!r}") from None


def read_config_file(path, defaults):
    """The assignments of a file of flags, as {key: value}, each checked against its default."""
    namespace = {}
    try:
        with open(path) as f:
            exec(f.read(), namespace)
    except OSError:
        raise SystemExit(f"no config file '{path}' (flags are written --key=value)") from None
    except SystemExit:
        raise SystemExit(f"{path} calls exit(); a file of flags only assigns values") from None
    except Exception as e:
        raise SystemExit(f"{path} does not run: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}
    for key, value in values.items():
        if key not in defaults:
            raise SystemExit(f"{path} sets unknown key '{key}'; --help lists the flags")
        if type(value) is not type(defaults[key]) and not (type(value) is int and type(defaults[key]) is float):
            raise SystemExit(f"{path} sets {key}={value!r}: expected {type(defaults[key]).__name__} like the "
                             f"default {defaults[key]!r}")
    return {k: float(v) if type(defaults[k]) is float else v for k, v in values.items()}  # an int is a fine float


def configure(argv, defaults, doc=''):
    """Files of flags, then --key=value flags, over defaults: (settings, the flags argv set). --help lists them."""
    given = {}  # the settings argv gives, in order: a later one wins
    for arg in sorted(argv, key=lambda a: a.startswith('--')):  # files first, wherever given: then flags win
        if arg in ('-h', '--help'):
            print(doc.strip(), '\nflags and defaults:', *(f'  --{k}={v!r}' for k, v in defaults.items()), sep='\n')
            raise SystemExit(0)
        key, eq, raw = arg[2:].partition('=')
        if not arg.startswith('--'):
            values = read_config_file(arg, defaults)
        elif not eq:
            raise SystemExit(f"flags are written --key=value, got '{arg}'")
        elif key not in defaults:
            raise SystemExit(f"unknown flag --{key}; --help lists the flags")
        else:
            values = {key: parse_value(key, raw, defaults[key])}
        given.update(values)
    return types.SimpleNamespace(**{**defaults, **given}), set(given)


def parse_ints(flag, text, example='1024,4k,1M'):
    """A flag's comma-separated ints, k and M suffixes allowed: '128,1k,1M' -> [128, 1024, 1048576]."""
    scale = {'k': 2 ** 10, 'K': 2 ** 10, 'm': 2 ** 20, 'M': 2 ** 20}
    try:
        return [int(n[:-1]) * scale[n[-1]] if n[-1] in scale else int(n) for n in text.replace(' ', '').split(',') if n]
    except ValueError:
        raise SystemExit(f"--{flag} is a comma-separated list of integers like {example}, not '{text}'") from None
