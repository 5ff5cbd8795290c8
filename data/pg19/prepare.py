"""
PG-19 (Rae et al. 2020): books from Project Gutenberg published before 1919, the long-context language-modelling
benchmark the Infini-attention paper reports (section 4.1). A book averages about 400k characters (roughly 100k
GPT-2 tokens), so unlike the default corpus almost every window of 8k or 32k tokens lies inside one document.

One document per book, each followed by end-of-text; GPT-2's BPE by default. Train is PG-19's train split (its
first --max_books books), val is its validation split (50 books): the paper's split, so no book straddles it.

  python data/pg19/prepare.py                          # 1000 train books (about 100M tokens), from the hub
  python data/pg19/prepare.py --max_books=0            # all 28,602 (about 3B tokens, 6 GB of train.bin, 12 GB RAM)
  python data/pg19/prepare.py --local_dir=pg19/        # the same from .txt files: pg19/train/, pg19/validation/

Online it streams the Parquet copy of PG-19 on the Hugging Face hub with the `datasets` library (pip install
datasets), so only the books it uses are downloaded. --local_dir reads the layout of DeepMind's release of PG-19
(train/ and validation/ folders of <id>.txt files); a folder of .txt files without them is split by file name.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import get_tokenizer  # noqa: E402
from data.writing import encode_documents, parse_flags, read_text, split_by_file, write_dataset  # noqa: E402

HUB_ID = 'emozilla/pg19'  # PG-19 as Parquet (the original loading script no longer runs in datasets >= 3)
SPLITS = {'train': 'train', 'val': 'validation'}  # our split: PG-19's


def hub_books(split, max_books):
    """The texts of a PG-19 split from the hub, streamed one book at a time, at most max_books of them (0 = all)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("PG-19 from the hub needs the datasets library: pip install datasets; or give "
                         "--local_dir=DIR of .txt files") from None
    try:
        books = load_dataset(HUB_ID, split=split, streaming=True)
        if max_books:
            books = books.take(max_books)
        for book in books:
            yield book['text']
    except Exception as e:  # offline, a proxy, a moved dataset: the exception's name says which, its text is long
        raise SystemExit(f"cannot read {HUB_ID} from the Hugging Face hub ({type(e).__name__}); it needs the "
                         f"internet, or give --local_dir=DIR of .txt files") from None


def local_books(local_dir, val_fraction):
    """{'train': [paths], 'val': [paths]} of the .txt files under local_dir: its train/ and validation/ folders
    when it has them, else every .txt file split by a hash of its name (as python_stdlib splits its files)."""
    def txt_files(folder):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.txt'))
    if not os.path.isdir(local_dir):
        raise SystemExit(f"--local_dir={local_dir} is not a folder: give a folder of .txt files")
    if all(os.path.isdir(os.path.join(local_dir, name)) for name in SPLITS.values()):
        return {ours: txt_files(os.path.join(local_dir, theirs)) for ours, theirs in SPLITS.items()}
    paths = txt_files(local_dir)
    if len(paths) < 2:
        raise SystemExit(f"found {len(paths)} .txt file(s) in {local_dir}: need at least 2 (one for val), or its "
                         f"train/ and validation/ folders")
    train, val = split_by_file([os.path.basename(p) for p in paths], val_fraction)
    return {'train': [os.path.join(local_dir, p) for p in train], 'val': [os.path.join(local_dir, p) for p in val]}


def main(argv=None):
    def own_flags(parser):
        # no 'char': a vocabulary of every character in thousands of books would be large and fit no other model
        parser.add_argument('--tokenizer', default='gpt2', choices=('gpt2', 'byte'),
                            help="GPT-2's BPE, as GPT-2 reads")
        parser.add_argument('--max_books', type=int, default=1000, help='train books to use (0 = all 28,602)')
        parser.add_argument('--local_dir', default='', help='read .txt files from this folder instead of the hub')
        parser.add_argument('--val_fraction', type=float, default=0.05,
                            help='a flat --local_dir: share of files to val')
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)))
    if args.max_books < 0:
        raise SystemExit(f"--max_books={args.max_books} must be 0 (all) or more")

    tok = get_tokenizer(args.tokenizer)
    if args.local_dir:
        paths = local_books(args.local_dir, args.val_fraction)
        if args.max_books:
            paths['train'] = paths['train'][:args.max_books]
        if not paths['train'] or not paths['val']:
            raise SystemExit(f"no .txt files in {args.local_dir}'s train/ or validation/ folder")
        books = {split: (read_text(p) for p in ps) for split, ps in paths.items()}
        source = f'pg19 from {args.local_dir}'
    else:
        books = {ours: hub_books(theirs, args.max_books if ours == 'train' else 0) for ours, theirs in SPLITS.items()}
        source = f'pg19 ({HUB_ID})'
    ids, counts = {}, {}
    for split, texts in books.items():  # a book at a time as uint16: a list of Python ints would take 15x more
        parts = [encode_documents(tok, [text]) for text in texts]
        ids[split] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        counts[split] = len(parts)
    write_dataset(args.out_dir, ids['train'], ids['val'], tok, source)
    n_docs = counts['train'] + counts['val']
    print(f"{counts['train']} train books, {counts['val']} val books, "
          f"{(len(ids['train']) + len(ids['val'])) / max(1, n_docs):,.0f} tokens per book on average")


if __name__ == '__main__':
    main()
