"""
Tiny Shakespeare at the character level, as nanoGPT's shakespeare_char: ~1.1M characters, the first 90% for
training and the rest for validation, one id per distinct character (65) plus end-of-text.

  python data/shakespeare_char/prepare.py                      # downloads input.txt next to this script
  python data/shakespeare_char/prepare.py --input=PATH         # a local copy of input.txt (offline)
"""

import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import CharTokenizer, is_binary  # noqa: E402
from data.writing import parse_flags, read_text, write_dataset  # noqa: E402

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def download(url, path):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise SystemExit(f'cannot download tiny Shakespeare from {url} ({getattr(e, "reason", e)}): '
                         f'pass --input=PATH with a local copy of input.txt') from None
    with open(path, 'wb') as f:
        f.write(data)


def main(argv=None):
    def own_flags(parser):
        parser.add_argument('--input', default='', help='a local input.txt (default: download it into --out_dir)')
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)))

    path = args.input or os.path.join(args.out_dir, 'input.txt')
    if args.input and not os.path.isfile(path):
        raise SystemExit(f'--input={path} is not a file: give the path of a local copy of input.txt')
    if args.input and is_binary(path):
        raise SystemExit(f'--input={path} is a binary file (it holds NUL bytes), not text')
    if not os.path.isfile(path):
        os.makedirs(args.out_dir, exist_ok=True)
        print(f'downloading {URL}')
        download(URL, path)
    text = read_text(path)
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    n = int(0.9 * len(ids))
    write_dataset(args.out_dir, ids[:n], ids[n:], tok, 'shakespeare_char')


if __name__ == '__main__':
    main()
