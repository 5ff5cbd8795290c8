"""
What the prepare.py scripts share: their flags, their example sets, a split by file, and the writing of a
dataset (data/common.py describes its files), each file atomically.
"""

import argparse
import hashlib
import os
import pickle

import numpy as np

from data.common import PlainUnpickler


def seeded_rng(seed):
    """np.random.default_rng(seed), with a one-line error for a seed it refuses."""
    if seed < 0:
        raise SystemExit(f'--seed={seed} must be >= 0')
    return np.random.default_rng(seed)


def check_val_fraction(fraction):
    """One line for a --val_fraction that leaves no train or no val data."""
    if not 0 < fraction < 1:
        raise SystemExit(f'--val_fraction={fraction} must lie between 0 and 1 (0.1 keeps a tenth for validation)')


def read_text(path):
    """A file's text; bytes that are not UTF-8 become U+FFFD rather than stopping the preparation."""
    with open(path, 'rb') as f:
        return f.read().decode('utf-8', errors='replace')


def encode_documents(tok, texts):
    """The ids of every text, each followed by end-of-text (nanoGPT's openwebtext layout), as one np.uint16 array."""
    ids = []
    for text in texts:
        ids.extend(tok.encode(text))
        ids.append(tok.eot_token)
    return to_uint16(ids)


def to_uint16(ids):
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2 ** 16):
        raise ValueError(f'token ids must lie in 0..65535 to be stored as uint16, got {ids.min()}..{ids.max()}')
    return ids.astype(np.uint16)


def write_atomically(path, write):
    """write(f) into a temporary file beside path, then rename it to path (atomic within a folder): a killed
    prepare never leaves a half-written file that looks whole."""
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        write(f)
    os.replace(tmp, path)


def write_split(path, ids):
    """A split's token ids, as np.uint16 back to back, written atomically to path (train.bin or val.bin)."""
    write_atomically(path, to_uint16(ids).tofile)


def write_dataset(out_dir, train_ids, val_ids, tok, dataset, **extra):
    """Write train.bin, val.bin and meta.pkl into out_dir and print their sizes. Each file is written atomically,
    and meta.pkl last (an old one is removed first): a folder with a meta.pkl holds a whole dataset."""
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise SystemExit(f'empty split (train {len(train_ids):,} tokens, val {len(val_ids):,}): give more input')
    meta = {'vocab_size': tok.vocab_size, 'tokenizer': tok.identity, 'eot_token': tok.eot_token,
            'dataset': dataset, **extra}
    meta_path = os.path.join(out_dir, 'meta.pkl')
    replaced = dataset_that_differs(out_dir, meta, len(train_ids), len(val_ids))
    try:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        write_split(os.path.join(out_dir, 'train.bin'), train_ids)
        write_split(os.path.join(out_dir, 'val.bin'), val_ids)
        write_atomically(meta_path, lambda f: pickle.dump(meta, f))
    except OSError as e:
        raise SystemExit(f'cannot write the dataset to --out_dir={out_dir} ({e.strerror or e})') from None
    print(f'{dataset}: train {len(train_ids):,} tokens, val {len(val_ids):,} tokens, '
          f'vocab {tok.vocab_size:,} ({tok.identity["kind"]}) -> {out_dir}')
    if replaced:
        print(f'note: this replaced another dataset in {out_dir} ({replaced}): a run that trained on it resumes on '
              f'these tokens')
    return meta


def dataset_that_differs(out_dir, meta, n_train, n_val):
    """What the dataset already in out_dir was, when it is not the one about to be written; '' otherwise."""
    try:
        with open(os.path.join(out_dir, 'meta.pkl'), 'rb') as f:
            old = PlainUnpickler(f).load()
        sizes = [os.path.getsize(os.path.join(out_dir, f'{split}.bin')) // 2 for split in ('train', 'val')]
    except Exception:  # nothing there, or nothing whole: nothing to tell
        return ''
    if old == meta and sizes == [n_train, n_val]:
        return ''
    return f"{old.get('dataset')}, {sizes[0]:,} train tokens, tokenizer {old.get('tokenizer', {}).get('kind')}"


class FlagParser(argparse.ArgumentParser):
    """argparse, with a bad flag a one-line error (argparse would print its usage first)."""

    def error(self, message):
        raise SystemExit(f'{message}; --help lists the flags')


def parse_flags(argv, doc, add_flags, out_dir, out_dir_help=None, examples=None):
    """A prepare.py's flags: add_flags(parser) adds the script's own; examples=(n_train, n_val), for a task made of
    examples, adds --n_train, --n_val and --seed after them; --out_dir comes last, its default out_dir. The
    description is the first paragraph of the script's docstring, doc."""
    parser = FlagParser(description=doc.split('\n\n')[0].strip(), allow_abbrev=False)
    add_flags(parser)
    if examples:
        parser.add_argument('--n_train', type=int, default=examples[0])
        parser.add_argument('--n_val', type=int, default=examples[1])
        parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--out_dir', default=out_dir, help=out_dir_help)
    args = parser.parse_args(argv)
    if examples and (args.n_train < 1 or args.n_val < 1):
        raise SystemExit('--n_train and --n_val must be at least 1')
    return args


def make_examples(make_example, inputs):
    """One example per item of inputs, back to back, as one flat np.int64 array of ids. make_example(item) returns
    (prompt_ids, answer_ids); every example has the same length."""
    examples = []
    for item in inputs:
        prompt, answer = make_example(item)
        examples.append(prompt + answer)
    return np.array(examples, dtype=np.int64).reshape(-1)


def example_splits(make_set, args):
    """(train_ids, val_ids): make_set(n) for --n_train examples, then for --n_val. An example that does not fit in
    --length tokens (make_set's ValueError) is a one-line error."""
    try:
        return make_set(args.n_train), make_set(args.n_val)
    except ValueError as e:
        raise SystemExit(f'--length={args.length}: {e}') from None


def split_by_file(paths, val_fraction):
    """(train, val) lists of paths: a file is val when the hash of its path, read as a number in [0, 1), is below
    val_fraction. At least one file goes to val, so tiny inputs still have a validation set."""
    def position(path):
        digest = hashlib.md5(path.replace(os.sep, '/').encode()).digest()
        return int.from_bytes(digest[:8], 'big') / 2 ** 64
    by_hash = sorted(paths, key=position)
    n_val = max(1, sum(position(p) < val_fraction for p in paths))
    val = set(by_hash[:n_val])
    return [p for p in paths if p not in val], [p for p in paths if p in val]
