"""
In-context copying, the smallest test of whether a model can look things up in its context: each example is
a random string of n letters (8 <= n <= length/2), repeated to the end of the example:

  q7Kd0TzAx1q7Kd0TzAx1q7Kd0TzAx1q7...

After the first copy every letter is predictable, but only by finding its earlier occurrence and reading what
followed it (an induction head). A letter costs log(64) = 4.16 nats to a model that cannot copy; one that copies
pays that for the first copy only (about 1.3 nats per letter on average at length 64). Byte-level, examples back
to back with example_len in meta.pkl.

  python data/copy/prepare.py --length=64
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import ByteTokenizer  # noqa: E402
from data.writing import example_splits, parse_flags, seeded_rng, write_dataset  # noqa: E402

ALPHABET = np.frombuffer(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/', dtype=np.uint8)


def make_set(n, length, rng):
    """n examples of `length` byte ids, back to back, each a random string repeated to fill it."""
    letters = ALPHABET[rng.integers(0, len(ALPHABET), size=(n, length))].astype(np.int64)
    period = rng.integers(8, length // 2 + 1, size=n)
    return letters[np.arange(n)[:, None], np.arange(length)[None, :] % period[:, None]].reshape(-1)


def main(argv=None):
    def own_flags(parser):
        parser.add_argument('--length', type=int, default=64, help='tokens per example')
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)), examples=(200000, 2000))
    if args.length < 16:
        raise SystemExit(f'--length={args.length} must be at least 16')
    rng = seeded_rng(args.seed)
    train_ids, val_ids = example_splits(lambda n: make_set(n, args.length, rng), args)
    write_dataset(args.out_dir, train_ids, val_ids, ByteTokenizer(), 'copy', example_len=args.length)


if __name__ == '__main__':
    main()
