"""Datasets and tokenizers: every prepare.py end to end on tiny inputs, round trips, meta.pkl, offline errors."""

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import tiktoken

import data.tokenizers as tokenizers
import data.writing as writing
from data.common import load_meta
from data.tokenizers import ByteTokenizer, CharTokenizer, TiktokenTokenizer, get_tokenizer, tokenizer_from_meta
from data.copy import prepare as copy_task
from data.passkey import prepare as passkey
from data.passkey.task import NEEDLE, QUESTION, make_passkey
from data.pg19 import prepare as pg19
from data.python_stdlib import prepare as stdlib
from data.shakespeare_char import prepare as shakespeare
from data.text import prepare as text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = 'héllo wörld → 🙂\n\tdef f(x):\n    return x  # <|endoftext|> stays text\n'


def local_encoding():
    """A real tiktoken Encoding built offline: one token per byte, and end-of-text as its special token."""
    gpt2_split = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name='bytes_test', pat_str=gpt2_split, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={'<|endoftext|>': 256})


def read_dataset(out_dir):
    train = np.fromfile(os.path.join(out_dir, 'train.bin'), dtype=np.uint16)
    val = np.fromfile(os.path.join(out_dir, 'val.bin'), dtype=np.uint16)
    return train, val, load_meta(out_dir)


def documents(ids, tok):
    """The texts between end-of-text ids (the last one ends the data)."""
    ids = ids.tolist()
    assert ids[-1] == tok.eot_token
    return tok.decode(ids[:-1]).split(tokenizers.EOT_TEXT)


# tokenizers

@pytest.mark.parametrize('tok', [ByteTokenizer(), CharTokenizer(SAMPLE), TiktokenTokenizer(local_encoding())],
                         ids=['byte', 'char', 'tiktoken'])
def test_round_trip(tok):
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < tok.vocab_size and i != tok.eot_token for i in ids)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids + [tok.eot_token] + ids) == SAMPLE + tokenizers.EOT_TEXT + SAMPLE
    again = tokenizer_from_meta({'tokenizer': tok.identity}) if tok.identity['kind'] != 'tiktoken' else tok
    assert again.encode(SAMPLE) == ids and again.vocab_size == tok.vocab_size
    assert pickle.loads(pickle.dumps(tok.identity)) == tok.identity  # plain Python values only


def test_byte_tokenizer_details():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eot_token, tok.identity) == (257, 256, {'kind': 'byte'})
    assert tok.encode('é') == [0xC3, 0xA9]
    assert tok.decode([0xC3]) == '\ufffd' and tok.decode([65, 999]) == 'A\ufffd'
    assert isinstance(tokenizer_from_meta({'kind': 'byte'}), ByteTokenizer)  # the identity alone works too


def test_char_tokenizer_details():
    tok = CharTokenizer('banana')
    assert (tok.identity, tok.vocab_size, tok.eot_token) == ({'kind': 'char', 'chars': 'abn'}, 4, 3)
    assert tok.encode('nab') == [2, 0, 1]
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode('zebra')
    with pytest.raises(ValueError, match='text='):
        get_tokenizer('char')


def test_tiktoken_tokenizer_details():
    tok = TiktokenTokenizer(local_encoding())
    assert (tok.identity, tok.vocab_size, tok.eot_token) == ({'kind': 'tiktoken', 'name': 'bytes_test'}, 257, 256)
    assert tok.encode('<|endoftext|>') == list(b'<|endoftext|>')  # special-looking text is ordinary text
    assert tok.decode([72, 105, 5000]) == 'Hi'  # ids past the vocabulary are dropped


def test_unknown_tokenizers():
    with pytest.raises(ValueError, match='choose one of'):
        get_tokenizer('sentencepiece')
    with pytest.raises(ValueError, match='unknown tokenizer identity'):
        tokenizer_from_meta({'kind': 'morse'})
    with pytest.raises(SystemExit, match='has no encoding'):
        tokenizer_from_meta({'kind': 'tiktoken', 'name': 'bytes_test'})


def test_gpt2_offline_fails_fast_with_a_hint(monkeypatch, tmp_path):
    # an empty tiktoken cache makes it download: offline that must end in one line suggesting byte
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path))
    t0 = time.time()
    try:
        tok = get_tokenizer('gpt2')
    except SystemExit as e:
        assert '--tokenizer=byte' in str(e) and '\n' not in str(e)
    else:  # online: the real GPT-2 encoding
        assert (tok.vocab_size, tok.eot_token, tok.identity) == (50257, 50256, {'kind': 'tiktoken', 'name': 'gpt2'})
    assert time.time() - t0 < tokenizers.TIKTOKEN_TIMEOUT + 5


def test_tiktoken_download_that_hangs_times_out(monkeypatch):
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: time.sleep(10))
    t0 = time.time()
    with pytest.raises(SystemExit, match='no answer in 0.2 s.*--tokenizer=byte'):
        tokenizers.load_tiktoken('gpt2', timeout=0.2)
    assert time.time() - t0 < 2


def test_load_meta_missing(tmp_path):
    with pytest.raises(SystemExit, match='prepare the dataset'):
        load_meta(str(tmp_path))


# python_stdlib

def make_python_tree(root):
    files = {f'mod{i}.py': f'def f{i}(x):\n    return x * {i}  # ü\n' for i in range(8)}
    files.update({'pkg/__init__.py': '', 'pkg/util.py': 'import os\n', 'notes.txt': 'not python',
                  'test/test_mod.py': 'skipped', 'pkg/tests/test_util.py': 'skipped', 'site-packages/x.py': 'skipped'})
    for name, content in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(root, name), 'w', encoding='utf-8') as f:
            f.write(content)
    return {n: c for n, c in files.items() if n.endswith('.py') and c != 'skipped'}


def test_python_stdlib_prepare_as_a_user_runs_it(tmp_path):
    sources = make_python_tree(tmp_path / 'src')
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'python_stdlib', 'prepare.py'),
                             f'--input={tmp_path / "src"}', f'--out_dir={out}'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert '10 files' in result.stdout
    train, val, meta = read_dataset(out)
    assert meta['vocab_size'] == 257 and meta['tokenizer'] == {'kind': 'byte'} and meta['eot_token'] == 256
    assert meta['dataset'].startswith('python_files') and 'example_len' not in meta
    tok = tokenizer_from_meta(meta)
    train_docs, val_docs = documents(train, tok), documents(val, tok)
    assert len(val_docs) >= 1 and sorted(train_docs + val_docs) == sorted(sources.values())  # whole files, no tests
    assert len(train) + len(val) == sum(len(c.encode()) for c in sources.values()) + len(sources)


def test_python_stdlib_split_is_by_file_and_deterministic():
    paths = [f'pkg{i // 10}/mod{i}.py' for i in range(400)]
    train, val = writing.split_by_file(paths, 0.05)
    assert sorted(train + val) == sorted(paths) and not set(train) & set(val)
    assert 5 < len(val) < 40
    assert writing.split_by_file(list(reversed(paths)), 0.05)[1] == list(reversed(val))
    assert len(writing.split_by_file(paths[:3], 0.05)[1]) == 1  # tiny inputs still get a val file


def test_python_stdlib_char_and_max_files(tmp_path):
    sources = make_python_tree(tmp_path / 'src')
    stdlib.main([f'--input={tmp_path / "src"}', f'--out_dir={tmp_path}', '--tokenizer=char', '--max_files=4'])
    train, val, meta = read_dataset(tmp_path)
    tok = tokenizer_from_meta(meta)
    assert meta['tokenizer']['kind'] == 'char' and meta['vocab_size'] == len(meta['tokenizer']['chars']) + 1
    docs = documents(train, tok) + documents(val, tok)
    assert len(docs) == 4 and set(docs) <= set(sources.values())


def test_python_stdlib_bad_input(tmp_path):
    with pytest.raises(SystemExit, match='not a folder'):
        stdlib.main([f'--input={tmp_path / "missing"}', f'--out_dir={tmp_path}'])
    with pytest.raises(SystemExit, match='need at least 2'):
        stdlib.main([f'--input={tmp_path}', f'--out_dir={tmp_path}'])


# shakespeare_char

def test_shakespeare_from_a_local_copy(tmp_path):
    path = tmp_path / 'input.txt'
    path.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 20)
    shakespeare.main([f'--input={path}', f'--out_dir={tmp_path}'])
    train, val, meta = read_dataset(tmp_path)
    tok = tokenizer_from_meta(meta)
    assert meta['dataset'] == 'shakespeare_char' and meta['vocab_size'] == len(set(path.read_text())) + 1
    assert len(train) == int(0.9 * len(path.read_text()))
    assert tok.decode(np.concatenate([train, val]).tolist()) == path.read_text()


def test_shakespeare_offline_says_to_pass_input(tmp_path, monkeypatch):
    monkeypatch.setattr(shakespeare, 'URL', 'http://127.0.0.1:9/input.txt')  # nothing listens there
    with pytest.raises(SystemExit, match='--input=PATH') as e:
        shakespeare.main([f'--out_dir={tmp_path}'])
    assert '\n' not in str(e.value) and not (tmp_path / 'input.txt').exists()
    with pytest.raises(SystemExit, match='not a file'):
        shakespeare.main([f'--input={tmp_path / "missing.txt"}', f'--out_dir={tmp_path}'])


# text

def test_text_folder_of_documents(tmp_path):
    src = tmp_path / 'src'
    (src / 'sub').mkdir(parents=True)
    texts = {'a.txt': 'alpha ' * 30, 'sub/b.md': 'béta ' * 30, 'c.txt': 'gamma ' * 30}
    for name, content in texts.items():
        (src / name).write_text(content, encoding='utf-8')
    (src / 'image.bin').write_bytes(b'\x89PNG\0\0')
    out = tmp_path / 'out'
    text.main([f'--input={src}', '--tokenizer=char', '--name=mine', f'--out_dir={out}'])
    train, val, meta = read_dataset(out)
    tok = tokenizer_from_meta(meta)
    assert meta['dataset'] == 'mine' and meta['eot_token'] == tok.eot_token
    ids = np.concatenate([train, val])
    assert len(train) == int(0.9 * len(ids))
    assert documents(ids, tok) == [texts['a.txt'], texts['c.txt'], texts['sub/b.md']]  # sorted by path, no binary
    text.main([f'--input={src}', '--ext=.md', f'--out_dir={out}'])
    train, val, meta = read_dataset(out)
    assert meta['tokenizer'] == {'kind': 'byte'}
    assert documents(np.concatenate([train, val]), ByteTokenizer()) == [texts['sub/b.md']]


def test_text_bad_input(tmp_path):
    with pytest.raises(SystemExit, match='does not exist'):
        text.main([f'--input={tmp_path / "nope"}', f'--out_dir={tmp_path}'])
    with pytest.raises(SystemExit, match='no text files'):
        text.main([f'--input={tmp_path}', f'--out_dir={tmp_path}'])
    with pytest.raises(SystemExit, match='plain folder name'):
        text.main([f'--input={tmp_path}', '--name=../x'])


# passkey

def check_passkey(prompt, answer, length, depth, tok):
    assert len(prompt) + len(answer) == length and all(isinstance(i, int) for i in prompt + answer)
    key = tok.decode(answer)
    assert len(key) == 5 and key.isdigit()
    needle = tok.encode(NEEDLE.format(key=key))
    question = tok.encode(QUESTION)
    n_filler = length - len(needle) - len(question) - len(answer)
    start = round(depth * n_filler)
    assert prompt[start:start + len(needle)] == needle  # the key sits exactly at its depth
    assert prompt[len(prompt) - len(question):] == question
    filler = tok.decode(prompt[:start] + prompt[start + len(needle):len(prompt) - len(question)])
    assert 'pass key' not in filler and key not in filler


SHORTEST = len(NEEDLE.format(key='12345')) + len(QUESTION) + 5  # no filler at all, in bytes


@pytest.mark.parametrize('length', [SHORTEST, SHORTEST + 1, 1000, 4096])
@pytest.mark.parametrize('depth', [0, 0.1, 0.5, 0.77, 1])
def test_make_passkey_length_and_depth(length, depth):
    tok = ByteTokenizer()
    prompt, answer = make_passkey(length, depth, np.random.default_rng(length), tok)
    check_passkey(prompt, answer, length, depth, tok)


def test_make_passkey_long_fast_and_any_tokenizer():
    tok = ByteTokenizer()
    t0 = time.time()
    prompt, answer = make_passkey(10 ** 6, 0.3, np.random.default_rng(0), tok)
    assert time.time() - t0 < 1
    check_passkey(prompt, answer, 10 ** 6, 0.3, tok)
    tiktok = TiktokenTokenizer(local_encoding())
    check_passkey(*make_passkey(777, 0.6, np.random.default_rng(1), tiktok), 777, 0.6, tiktok)


def test_make_passkey_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='needs at least'):
        make_passkey(50, 0.5, rng, ByteTokenizer())
    with pytest.raises(ValueError, match='between 0 and 1'):
        make_passkey(1000, 1.5, rng, ByteTokenizer())


def test_passkey_prepare(tmp_path):
    passkey.main(['--length=300', '--n_train=5', '--n_val=3', '--seed=7', f'--out_dir={tmp_path}'])
    train, val, meta = read_dataset(tmp_path)
    assert meta == {'vocab_size': 257, 'tokenizer': {'kind': 'byte'}, 'eot_token': 256, 'dataset': 'passkey',
                    'example_len': 300}
    assert (len(train), len(val)) == (5 * 300, 3 * 300)
    tok = ByteTokenizer()
    for example in np.concatenate([train, val]).reshape(-1, 300):
        example_text = tok.decode(example.tolist())
        key = example_text[-5:]
        assert f'The pass key is {key}. Remember it. {key} is the pass key.' in example_text
    with pytest.raises(SystemExit, match='--length=20'):
        passkey.main(['--length=20', f'--out_dir={tmp_path}'])


def test_copy_prepare(tmp_path):
    copy_task.main(['--length=32', '--n_train=50', '--n_val=5', f'--out_dir={tmp_path}'])
    meta = load_meta(str(tmp_path))
    assert meta['example_len'] == 32 and meta['tokenizer'] == {'kind': 'byte'}
    examples = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16).reshape(50, 32)
    assert set(examples.ravel().tolist()) <= set(copy_task.ALPHABET.tolist())
    for row in examples:  # a random string repeated: its period is between 8 and length / 2
        period = next(p for p in range(1, 33) if np.array_equal(row[p:], row[:32 - p]))
        assert 8 <= period <= 16


def test_a_killed_prepare_leaves_no_file_that_looks_whole(tmp_path):
    """Each file is written to a temporary file and renamed into place: a write that dies half-way leaves the old
    file as it was. write_dataset removes an old meta.pkl first and writes it last, so a folder whose meta.pkl is
    there holds a whole dataset."""
    path = tmp_path / 'val.bin'
    writing.write_split(str(path), [1, 2, 3])

    def dies(f):
        f.write(b'\0\0')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        writing.write_atomically(str(path), dies)
    assert np.fromfile(path, dtype=np.uint16).tolist() == [1, 2, 3]
    writing.write_dataset(str(tmp_path), [1, 2], [3], ByteTokenizer(), 'tiny')
    with pytest.raises(SystemExit, match='cannot write'):  # train.bin cannot be written: a folder is in its way
        (tmp_path / 'train.bin').unlink()
        (tmp_path / 'train.bin').mkdir()
        writing.write_dataset(str(tmp_path), [1, 2], [3], ByteTokenizer(), 'tiny')
    assert not (tmp_path / 'meta.pkl').exists()


def test_a_bad_prepare_flag_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r'^unrecognized arguments: --lenght=8; --help lists the flags$'):
        copy_task.main(['--lenght=8', f'--out_dir={tmp_path}'])
    with pytest.raises(SystemExit, match=r"^argument --n_val: invalid int value: 'x'; --help"):
        passkey.main(['--n_val=x'])
    with pytest.raises(SystemExit, match='--n_train and --n_val must be at least 1'):
        passkey.main(['--n_train=0', f'--out_dir={tmp_path}'])


# pg19: the hub is out of reach here, so the tests read a local folder in the release's layout

def make_books(root, layout):
    """Three train books and one val book as .txt files: in train/ and validation/, or all in one folder."""
    books = {'train': {f'{i}.txt': f'BOOK {i}.\n\n' + f'Chapter {i}: the wörds of book {i}. ' * 50
                       for i in (10, 11, 12)},
             'validation': {'20.txt': 'BOOK 20.\n\n' + 'The end of it all. ' * 40}}
    for split, files in books.items():
        folder = root / split if layout == 'release' else root
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (folder / name).write_text(content, encoding='utf-8')
    (root / 'README.md').write_text('not a book')
    return books


def test_pg19_from_a_local_release(tmp_path, monkeypatch):
    books = make_books(tmp_path / 'pg19', 'release')
    # GPT-2's BPE is downloaded on first use: a byte-level stand-in named gpt2 gives the same code path offline
    stand_in = tiktoken.Encoding(name='gpt2', pat_str=local_encoding()._pat_str,
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={'<|endoftext|>': 256})
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: stand_in)
    pg19.main([f'--local_dir={tmp_path / "pg19"}', f'--out_dir={tmp_path / "out"}'])
    train, val, meta = read_dataset(tmp_path / 'out')
    assert meta['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'} and meta['dataset'].startswith('pg19 from')
    tok = tokenizer_from_meta(meta)
    assert documents(train, tok) == list(books['train'].values())  # whole books, in file order
    assert documents(val, tok) == list(books['validation'].values())
    pg19.main([f'--local_dir={tmp_path / "pg19"}', f'--out_dir={tmp_path / "two"}', '--max_books=2'])
    assert len(documents(read_dataset(tmp_path / 'two')[0], tok)) == 2


def test_pg19_from_a_flat_folder_of_books(tmp_path):
    books = make_books(tmp_path / 'flat', 'flat')
    pg19.main([f'--local_dir={tmp_path / "flat"}', f'--out_dir={tmp_path}', '--tokenizer=byte'])
    train, val, meta = read_dataset(tmp_path)
    tok = tokenizer_from_meta(meta)
    every = {**books['train'], **books['validation']}
    assert sorted(documents(train, tok) + documents(val, tok)) == sorted(every.values())
    assert len(documents(val, tok)) >= 1


def test_pg19_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='is not a folder'):
        pg19.main([f'--local_dir={tmp_path / "nowhere"}', '--tokenizer=byte'])
    (tmp_path / 'one.txt').write_text('a single book')
    with pytest.raises(SystemExit, match=r'found 1 \.txt file'):
        pg19.main([f'--local_dir={tmp_path}', '--tokenizer=byte'])
    monkeypatch.setitem(sys.modules, 'datasets', None)  # as if datasets were not installed
    with pytest.raises(SystemExit, match='^PG-19 from the hub needs the datasets library: pip install datasets'):
        pg19.main(['--tokenizer=byte', f'--out_dir={tmp_path}'])
