"""
Several training runs on one plot, from the log.csv each run's out_dir holds (runs.py lists its columns):

    python tools/curves.py --runs=out-causal,out-selective,out-in,out-infini            # val loss by iteration
    python tools/curves.py --runs=out,out-selective --y=loss --x=time_s --out=speed.png  # training loss by seconds

It prints the numbers as a table, and with matplotlib it also draws them to --out (a PNG).
"""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: this script runs as python tools/curves.py
from configurator import configure, flags_of  # noqa: E402
from devices import run_script  # noqa: E402
from runs import read_log  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
runs = 'out'            # comma-separated out_dirs (or log.csv paths), one curve each
y = 'val_loss'          # the column to draw: val_loss, train_loss, loss, tokens_per_s, L0.gate0, ...
x = 'iter'              # the column along the bottom: iter, tokens or time_s
out = 'curves.png'      # the picture ('' = the table only)
title = ''              # '' = '<y> by <x>'
ymax = 0.0              # the top of the y axis, to look closer at the end of training (0 = all of it)
FLAGS = flags_of(globals())
# -----------------------------------------------------------------------------------------------------------


def curve(rows, x_col, y_col):
    """The (x, y) points of the rows that have a y (evaluation rows for val_loss, log rows for loss)."""
    return [(r[x_col], r[y_col]) for r in rows if r.get(y_col) is not None and r.get(x_col) is not None]


def load_curves(folders, x_col, y_col):
    """{run name: [(x, y), ...]} of each run; a one-line error when a run has no such column."""
    curves = {}
    names = [os.path.basename(os.path.normpath(f if os.path.isdir(f) else os.path.dirname(f))) for f in folders]
    for folder, name in zip(folders, names):
        rows = read_log(folder)
        if not rows:  # the header alone, or nothing: a run stopped before its first row
            raise SystemExit(f"{folder}/log.csv has no rows yet: the run has not logged a step")
        if names.count(name) > 1:  # runs/a/out and runs/b/out: the last name alone would merge them
            name = os.path.normpath(folder)
        known = set().union(*(r.keys() for r in rows)) if rows else set()
        for col in (x_col, y_col):
            if col not in known:
                raise SystemExit(f"{folder}/log.csv has no column '{col}'; it has: {', '.join(sorted(known))}")
        curves[name] = curve(rows, x_col, y_col)
    return curves


def table(curves, x_col):
    """A markdown table: one row per x, one column per run."""
    xs = sorted({px for points in curves.values() for px, _ in points})
    lookup = {name: dict(points) for name, points in curves.items()}
    lines = [f"| {x_col} | " + ' | '.join(curves) + ' |', '|---:|' + '---:|' * len(curves)]
    for px in xs:
        cells = [number(lookup[name][px]) if px in lookup[name] else '' for name in curves]
        lines.append(f'| {px:g} | ' + ' | '.join(cells) + ' |')
    return lines


def number(v):
    """Losses and gates to 4 decimals, big numbers (tokens/s) whole."""
    return f'{v:.4f}' if abs(v) < 1000 else f'{v:,.0f}'


def plot(curves, x_col, y_col, path, title_text, y_max=0.0):
    """The curves on one set of axes, written to path; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([px for px, _ in points], [py for _, py in points], marker='o' if len(points) < 30 else None,
                markersize=3, label=name)
    ax.set_xlabel(x_col)
    ax.set_ylabel(y_col)
    ax.set_title(title_text or f'{y_col} by {x_col}')
    if y_max:
        ax.set_ylim(top=y_max)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except ValueError as e:  # a format matplotlib does not write: its message lists those it does
        raise SystemExit(f"--out={path}: {e}") from None
    plt.close(fig)
    return True


def main(argv):
    settings, _ = configure(argv, FLAGS, __doc__)
    if not math.isfinite(settings.ymax) or settings.ymax < 0:
        raise SystemExit(f"--ymax={settings.ymax}: the top of the y axis, a number > 0 (0 = all of it)")
    folders = [f for f in settings.runs.split(',') if f]
    if not folders:
        raise SystemExit('--runs is a comma-separated list of out_dirs, like --runs=out,out-selective')
    curves = load_curves(folders, settings.x, settings.y)
    lowest = min((py for points in curves.values() for _, py in points), default=None)
    if settings.ymax and lowest is not None and settings.ymax <= lowest:  # the plot would be empty, upside down
        raise SystemExit(f"--ymax={settings.ymax:g} is below every {settings.y} of these runs (the lowest is "
                         f"{lowest:.4g}): raise it, or give --ymax=0 for all of it")
    print('\n'.join(table(curves, settings.x)))
    if settings.out:
        if plot(curves, settings.x, settings.y, settings.out, settings.title, settings.ymax):
            print(f'wrote {settings.out}')
        else:
            print('matplotlib is not installed: the table above is all (pip install matplotlib for the plot)')


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
