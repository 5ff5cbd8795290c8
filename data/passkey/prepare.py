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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import ByteTokenizer  # noqa: E402
from data.writing import example_splits, make_examples, parse_flags, seeded_rng, write_dataset  # noqa: E402
from data.passkey.task import make_passkey  # noqa: E402


def main(argv=None):
    def own_flags(parser):
        parser.add_argument('--length', type=int, default=1024, help='tokens per example (prompt + answer)')
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)), examples=(2000, 100))
    tok = ByteTokenizer()
    rng = seeded_rng(args.seed)

    def make_set(n):  # uniformly random depths and keys
        return make_examples(lambda _: make_passkey(args.length, rng.uniform(0, 1), rng, tok), range(n))
    train_ids, val_ids = example_splits(make_set, args)
    write_dataset(args.out_dir, train_ids, val_ids, tok, 'passkey', example_len=args.length)


if __name__ == '__main__':
    main()
