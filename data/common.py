"""
Tokenizers and the file format shared by every dataset, and what the prepare.py scripts share: their flags, their
example sets, and the writing of a dataset, each file atomically.

A prepared dataset is a folder with train.bin and val.bin (token ids as np.uint16, back to back, read by
train.py with np.memmap as nanoGPT does) and meta.pkl, a dict of plain Python values:

  vocab_size    int, the number of token ids
  tokenizer     the tokenizer's identity, e.g. {'kind': 'byte'}, {'kind': 'char', 'chars': 'abc'},
                {'kind': 'tiktoken', 'name': 'gpt2'}; tokenizer_from_meta rebuilds the tokenizer from it
  eot_token     int, the end-of-text id that follows every document (a dataset of one document may not use it)
  dataset       str, what the data is
  example_len   optional int: the data is made of examples of exactly this many tokens, back to back (passkey)

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str, .identity, .vocab_size and .eot_token.
"""

import argparse
import hashlib
import os
import pickle
import threading

import numpy as np

EOT_TEXT = '<|endoftext|>'  # how an end-of-text id decodes, as tiktoken shows it
TOKENIZERS = ('byte', 'char', 'gpt2')
TIKTOKEN_TIMEOUT = 20.0  # seconds to wait for tiktoken to load (and download) an encoding before giving up


class ByteTokenizer:
    """UTF-8 bytes are the ids 0..255, and 256 is end-of-text: no vocabulary to build, no unknown text."""

    identity = {'kind': 'byte'}
    eot_token = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode('utf-8'))

    def decode(self, ids):
        # bytes decode a run at a time, so a character split over several ids comes out whole
        text, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            text.append(run.decode('utf-8', errors='replace'))
            text.append(EOT_TEXT if i == self.eot_token else '\ufffd')
            run = bytearray()
        text.append(run.decode('utf-8', errors='replace'))
        return ''.join(text)


class CharTokenizer:
    """nanoGPT's character-level tokenizer: one id per distinct character of the data, then end-of-text."""

    def __init__(self, chars):
        self.chars = ''.join(sorted(set(chars)))
        if len(self.chars) >= 2 ** 16:  # ids are stored as uint16, and end-of-text takes one more
            raise SystemExit(f"the text has {len(self.chars):,} distinct characters, more than a character-level "
                             f"vocabulary stored as uint16 holds (65,535): use --tokenizer=byte or gpt2")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self.identity = {'kind': 'char', 'chars': self.chars}

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this character-level vocabulary "
                             f"(it was built from the training text): remove it from the input") from None

    def decode(self, ids):
        return ''.join(self.chars[i] if 0 <= i < self.eot_token else EOT_TEXT if i == self.eot_token else '\ufffd'
                       for i in ids)


class TiktokenTokenizer:
    """A tiktoken encoding (GPT-2's BPE for 'gpt2'); takes an already built tiktoken.Encoding."""

    def __init__(self, enc):
        self.enc = enc
        self.eot_token = enc.eot_token
        self.vocab_size = enc.n_vocab
        self.identity = {'kind': 'tiktoken', 'name': enc.name}

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # ordinary: text that looks like a special token stays text

    def decode(self, ids):
        # ids past the vocabulary (a model's padded embedding table) have no text: they are dropped
        return self.enc.decode([i for i in ids if 0 <= i < self.vocab_size])


def load_tiktoken(name, timeout=TIKTOKEN_TIMEOUT, instead="prepare the data with --tokenizer=byte (or char) instead"):
    """tiktoken.get_encoding(name), or a one-line SystemExit when it cannot be had (it is downloaded on first use).
    tiktoken's download has no timeout, so on a machine whose network drops packets it would hang: wait in a
    thread for at most `timeout` seconds."""
    try:
        import tiktoken
    except ImportError:
        raise SystemExit(f"the '{name}' tokenizer needs tiktoken (pip install tiktoken), or use --tokenizer=byte")
    if name not in tiktoken.list_encoding_names():
        raise SystemExit(f"tiktoken has no encoding '{name}', it has: {', '.join(tiktoken.list_encoding_names())}")
    result = {}

    def load():
        try:
            result['enc'] = tiktoken.get_encoding(name)
        except Exception as e:
            result['error'] = type(e).__name__  # its message can be a screenful of urllib3 internals

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    if 'enc' in result:
        return result['enc']
    reason = result.get('error', f'no answer in {timeout:g} s')
    raise SystemExit(f"cannot load tiktoken's '{name}' encoding, which is downloaded on first use and needs the "
                     f"internet ({reason}); offline, copy the files of tiktoken's cache from a machine that has them "
                     f"into a folder and set TIKTOKEN_CACHE_DIR to it, or {instead}")


def get_tokenizer(name, text=None):
    """A tokenizer by name: 'byte', 'char' (its vocabulary is the characters of `text`) or 'gpt2'."""
    if name == 'byte':
        return ByteTokenizer()
    if name == 'char':
        if text is None:
            raise ValueError("the char tokenizer builds its vocabulary from the text: pass text=")
        return CharTokenizer(text)
    if name == 'gpt2':
        return TiktokenTokenizer(load_tiktoken('gpt2'))
    raise ValueError(f"unknown tokenizer '{name}', choose one of: {', '.join(TOKENIZERS)}")


def tokenizer_from_meta(meta):
    """The tokenizer recorded in a meta.pkl dict, or given by its identity dict alone."""
    identity = meta.get('tokenizer', meta)
    kind = identity.get('kind')
    if kind == 'byte':
        return ByteTokenizer()
    if kind == 'char':
        return CharTokenizer(identity['chars'])
    if kind == 'tiktoken':  # a model trained on these tokens: its ids become text only through them
        return TiktokenTokenizer(load_tiktoken(identity['name'], instead="use a model trained on byte or char data"))
    raise ValueError(f"unknown tokenizer identity {identity!r}: expected kind 'byte', 'char' or 'tiktoken'")


class PlainUnpickler(pickle.Unpickler):
    """Reads plain data only (dicts, lists, strings, numbers), which is all a meta.pkl holds: a pickle that names a
    class or a function could run code when read, so it is refused instead."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def load_meta(data_dir):
    """The meta.pkl dict of a prepared dataset folder, or a one-line error when it is missing or unreadable."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.isfile(path):
        raise SystemExit(f"no {path}: prepare the dataset first (python data/<name>/prepare.py)")
    try:
        with open(path, 'rb') as f:
            meta = PlainUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if 'it names' not in str(e):
            raise SystemExit(f"{path} cannot be read ({type(e).__name__}); prepare the dataset again") from None
        raise SystemExit(f"{path} is not plain data ({e}), so it could run code when read and is not read; "
                         f"prepare the dataset again with this repository's prepare.py") from None
    except Exception as e:  # truncated, empty, or not a pickle: the unpickler's own message says little
        raise SystemExit(f"{path} cannot be read ({type(e).__name__}); prepare the dataset again") from None
    if isinstance(meta, dict) and 'stoi' in meta and 'tokenizer' not in meta:  # nanoGPT's character-level meta
        raise SystemExit(f"{path} is nanoGPT's (itos and stoi, no tokenizer entry): prepare the text again with "
                         f"python data/text/prepare.py --tokenizer=char")
    if not isinstance(meta, dict) or not isinstance(meta.get('vocab_size'), int) or 'tokenizer' not in meta:
        raise SystemExit(f"{path} has no vocab_size and tokenizer (see data/common.py for the format); prepare the "
                         f"dataset again")
    return meta


def check_tokens(path, vocab_size):
    """One line when a .bin file is not token ids below vocab_size: a size that is not whole uint16s, or an id past
    the vocabulary (which would fail inside the model, or on a GPU stop with a device assert). Reads the file once."""
    size = os.path.getsize(path)
    if size % 2:
        raise SystemExit(f"{path} has {size} bytes, not a whole number of uint16 token ids; prepare it again")
    data = np.memmap(path, dtype=np.uint16, mode='r') if size else np.zeros(0, np.uint16)
    chunk = 2 ** 24
    top = max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=0)
    if top >= vocab_size:
        raise SystemExit(f"{path} holds token id {top}, past the vocabulary of {vocab_size}: it was prepared with "
                         f"another tokenizer than meta.pkl's; prepare it again")


# A run's data_dir, as a checkpoint stores it: '' for data/<dataset>, a path inside the repository relative to it,
# else the absolute path. A clone moved to another path then finds its own data.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stored_data_dir(data_dir, dataset):
    path = os.path.abspath(data_dir)
    if path == os.path.join(REPO, 'data', dataset):
        return ''
    inside = os.path.commonpath([path, REPO]) == REPO
    return os.path.relpath(path, REPO) if inside else path


def resolve_data_dir(stored, dataset):
    """The folder a stored data_dir names, in this copy of the repository."""
    return os.path.join(REPO, stored or os.path.join('data', dataset))


def seeded_rng(seed):
    """np.random.default_rng(seed), with a one-line error for a seed it refuses."""
    if seed < 0:
        raise SystemExit(f'--seed={seed} must be >= 0')
    return np.random.default_rng(seed)


def is_binary(path):
    """True for a file with a NUL byte in its first 8 KB: not text."""
    with open(path, 'rb') as f:
        return b'\0' in f.read(8192)


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


# -----------------------------------------------------------------------------------------------------------
# What the prepare.py scripts share: their flags, their example sets, a split by file.

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
    except UnicodeEncodeError:  # bytes a shell passed that are not UTF-8 (Python keeps them as surrogates)
        raise SystemExit("--start holds bytes that are not UTF-8 text; give text, or --start=FILE:path") from None
    except ValueError as e:  # a character the char-level vocabulary lacks
        raise SystemExit(str(e)) from None
    if not ids:
        raise SystemExit("--start is empty: give at least one character to start from")
    return ids
