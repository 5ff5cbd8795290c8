"""
The file format shared by every dataset, and its reading: what train.py needs of the data. data/tokenizers.py
turns text into token ids and back; data/writing.py holds what the prepare.py scripts share to write a dataset.

A prepared dataset is a folder with train.bin and val.bin (token ids as np.uint16, back to back, read by
train.py with np.memmap as nanoGPT does) and meta.pkl, a dict of plain Python values:

  vocab_size    int, the number of token ids
  tokenizer     the tokenizer's identity, e.g. {'kind': 'byte'}, {'kind': 'char', 'chars': 'abc'},
                {'kind': 'tiktoken', 'name': 'gpt2'}; data/tokenizers.py rebuilds the tokenizer from it
  eot_token     int, the end-of-text id that follows every document (a dataset of one document may not use it)
  dataset       str, what the data is
  example_len   optional int: the data is made of examples of exactly this many tokens, back to back (passkey)
"""

import os
import pickle

import numpy as np


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

