"""
Tokenizers: text into token ids and back. A dataset's meta.pkl records which one made its ids (its identity),
and so does every checkpoint train.py writes, so sample.py decodes with the tokenizer the model learned.

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str, .identity, .vocab_size and .eot_token.
"""

import os
import threading

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
                             f"(it was built from the training text)") from None

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


def checkpoint_tokenizer(checkpoint, path):
    """The tokenizer a checkpoint records (train.py saves its data's), or a one-line error saying why there is none."""
    identity = checkpoint.get('tokenizer')
    if identity is None:
        raise SystemExit(f"{path} records no tokenizer, so its token ids cannot become text (train.py writes the "
                         f"data's tokenizer into every checkpoint; this one came from elsewhere)")
    try:
        return tokenizer_from_meta(identity)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise SystemExit(f"{path} was trained on tokens of {identity!r}, a tokenizer this repository cannot rebuild "
                         f"(it knows byte, char and tiktoken), so its token ids cannot become text") from None


def is_binary(path):
    """True for a file with a NUL byte in its first 8 KB: not text."""
    with open(path, 'rb') as f:
        return b'\0' in f.read(8192)


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
    except ValueError as e:  # a character the char-level vocabulary lacks, in a prompt given or the default one
        raise SystemExit(f"--start: {e}; give a --start made of the training text's characters") from None
    if not ids:
        raise SystemExit("--start is empty: give at least one character to start from")
    return ids
