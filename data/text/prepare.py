"""
Any text as a dataset: one file, or every text file under a folder (sorted by path, one document per file, each
followed by end-of-text). As nanoGPT's shakespeare, the first 90% of the tokens train and the rest validate.

  python data/text/prepare.py --input=book.txt                                  # byte-level, into data/text/
  python data/text/prepare.py --input=notes/ --tokenizer=char --name=notes       # into data/notes/
  python data/text/prepare.py --input=corpus/ --tokenizer=gpt2 --ext=.md,.txt    # only these files
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import TOKENIZERS, get_tokenizer, is_binary  # noqa: E402
from data.writing import check_val_fraction, encode_documents, parse_flags, read_text, write_dataset  # noqa: E402


def text_files(root, extensions):
    """The files under root (sorted, hidden ones skipped) ending in one of extensions (all when empty), except
    binary ones (a NUL byte in the first 8 KB)."""
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        paths += [os.path.join(folder, f) for f in files
                  if not f.startswith('.') and (not extensions or f.endswith(extensions))]
    return [p for p in sorted(paths) if not is_binary(p)]


def main(argv=None):
    data_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def own_flags(parser):
        parser.add_argument('--input', required=True, help='a text file, or a folder of them')
        parser.add_argument('--tokenizer', default='byte', choices=TOKENIZERS)
        parser.add_argument('--name', default='text', help='the dataset name: it goes to data/NAME/')
        parser.add_argument('--ext', default='',
                            help='folder input: comma-separated file endings to keep (all if empty)')
        parser.add_argument('--val_fraction', type=float, default=0.1)
    args = parse_flags(argv, __doc__, own_flags, '', out_dir_help='where to write (default: data/NAME/)')
    if not args.name or os.sep in args.name or args.name.startswith('.'):
        raise SystemExit(f'--name={args.name} must be a plain folder name (it becomes data/NAME/)')

    check_val_fraction(args.val_fraction)
    if os.path.isfile(args.input):
        if is_binary(args.input):
            raise SystemExit(f'--input={args.input} is a binary file (it holds NUL bytes), not text')
        paths = [args.input]
    elif os.path.isdir(args.input):
        paths = text_files(args.input, tuple(e for e in args.ext.split(',') if e))
    else:
        raise SystemExit(f'--input={args.input} does not exist: give a text file or a folder of text files')
    if not paths:
        raise SystemExit(f'no text files under {args.input}' + (f' ending in {args.ext}' if args.ext else ''))
    texts = [read_text(p) for p in paths]
    tok = get_tokenizer(args.tokenizer, text=''.join(texts))
    ids = encode_documents(tok, texts)
    n = int((1 - args.val_fraction) * len(ids))
    write_dataset(args.out_dir or os.path.join(data_root, args.name), ids[:n], ids[n:], tok, args.name)
    print(f'{len(paths)} file(s) from {args.input}')


if __name__ == '__main__':
    main()
