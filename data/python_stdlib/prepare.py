"""
The offline default dataset: the source of the Python standard library that runs this script.

One document per .py file, each followed by end-of-text, byte-level by default (256 byte ids + end-of-text).
Skipped: site-packages (whatever happens to be installed, not the stdlib) and the test folders
(test/, tests/, idle_test/: ~1.6x the size of the library, much of it generated or repetitive data), which
leaves ~730 files, ~12 MB for Python 3.11. Files go to val by a hash of their relative path, so the split is the
same on every machine and no file straddles it.

  python data/python_stdlib/prepare.py                        # byte-level, writes data/python_stdlib/
  python data/python_stdlib/prepare.py --tokenizer=gpt2       # GPT-2 BPE (needs tiktoken's file, i.e. internet)
  python data/python_stdlib/prepare.py --input=DIR --max_files=50 --out_dir=/tmp/tiny
"""

import os
import platform
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import TOKENIZERS, get_tokenizer  # noqa: E402
from data.writing import (check_val_fraction, encode_documents, parse_flags, read_text, split_by_file,  # noqa: E402
                          write_dataset)

SKIP_DIRS = {'site-packages', 'test', 'tests', 'idle_test', '__pycache__'}


def python_files(root):
    """Relative paths of the .py files under root, sorted, outside SKIP_DIRS and hidden folders."""
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith('.')]
        paths += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith('.py')]
    return sorted(paths)


def main(argv=None):
    def own_flags(parser):
        parser.add_argument('--tokenizer', default='byte', choices=TOKENIZERS)
        parser.add_argument('--input', default=sysconfig.get_paths()['stdlib'],
                            help='folder of .py files (default: the running Python\'s standard library)')
        parser.add_argument('--max_files', type=int, default=0, help='use only the first N files (0 = all)')
        parser.add_argument('--val_fraction', type=float, default=0.05)
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)))
    check_val_fraction(args.val_fraction)
    if args.max_files < 0:
        raise SystemExit(f'--max_files={args.max_files} must be >= 0 (0 = all files)')
    if not os.path.isdir(args.input):
        raise SystemExit(f'--input={args.input} is not a folder: give a folder of .py files')

    t0 = time.time()
    paths = python_files(args.input)
    if args.max_files > 0:
        paths = paths[:args.max_files]
    if len(paths) < 2:
        raise SystemExit(f'found {len(paths)} .py file(s) under {args.input}: need at least 2 (one for val)')
    train_paths, val_paths = split_by_file(paths, args.val_fraction)
    texts = {p: read_text(os.path.join(args.input, p)) for p in paths}
    tok = get_tokenizer(args.tokenizer, text=''.join(texts.values()))
    train_ids = encode_documents(tok, [texts[p] for p in train_paths])
    val_ids = encode_documents(tok, [texts[p] for p in val_paths])

    default_input = args.input == sysconfig.get_paths()['stdlib']
    dataset = f'python_stdlib-{platform.python_version()}' if default_input else f'python_files:{args.input}'
    write_dataset(args.out_dir, train_ids, val_ids, tok, dataset)
    n_bytes = sum(len(t.encode('utf-8')) for t in texts.values())
    print(f'{len(paths)} files ({len(train_paths)} train, {len(val_paths)} val), {n_bytes / 1e6:.1f} MB of source, '
          f'{len(train_ids) + len(val_ids):,} tokens in {time.time() - t0:.1f} s')


if __name__ == '__main__':
    main()
