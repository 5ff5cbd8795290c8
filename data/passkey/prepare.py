"""
Passkey retrieval, the synthetic long-context test of Landmark Attention and Infini-attention: a 5-digit key is
hidden at some depth in repeated filler text, and the example ends by asking for it:

  The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
  The pass key is 12345. Remember it. 12345 is the pass key.
  The grass is green. ... There and back again. The gr
  What is the pass key? The pass key is 12345

data/passkey/task.py builds one example of any length (evaluate.py measures retrieval accuracy with it); this
script writes train/val sets of examples of one length, byte-level, back to back, with example_len in meta.pkl
so train.py samples windows that start at an example.

  python data/passkey/prepare.py --length=1024 --n_train=2000 --n_val=100
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.common import ByteTokenizer, seeded_rng, write_dataset  # noqa: E402
from data.passkey.task import make_passkey  # noqa: E402


def make_set(n, length, rng, tok):
    """n examples with uniformly random depths and keys, back to back, as one flat array of ids."""
    examples = []
    for _ in range(n):
        prompt, answer = make_passkey(length, rng.uniform(0, 1), rng, tok)
        examples.append(prompt + answer)
    return np.array(examples, dtype=np.int64).reshape(-1)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(), allow_abbrev=False)
    parser.add_argument('--length', type=int, default=1024, help='tokens per example (prompt + answer)')
    parser.add_argument('--n_train', type=int, default=2000)
    parser.add_argument('--n_val', type=int, default=100)
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--out_dir', default=here)
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_val < 1:
        raise SystemExit('--n_train and --n_val must be at least 1')

    tok = ByteTokenizer()
    rng = seeded_rng(args.seed)
    try:
        train_ids = make_set(args.n_train, args.length, rng, tok)
        val_ids = make_set(args.n_val, args.length, rng, tok)
    except ValueError as e:
        raise SystemExit(f'--length={args.length}: {e}') from None
    write_dataset(args.out_dir, train_ids, val_ids, tok, 'passkey', example_len=args.length)


if __name__ == '__main__':
    main()
