"""
Parity, a control for Selective Attention (Leviathan et al. 2024, section 1): a string of bits, then the parity of
their sum. Reading left to right, only the running parity matters, so every earlier bit may be masked once it is
counted:

        0110100111=0

make_parity builds one example of exactly `length` tokens (left-padded with spaces), with a number of bits drawn
between min_bits and max_bits; the answer is '0' (even number of ones) or '1'. Guessing is right half the time.
This script writes train/val sets, byte-level, back to back, with example_len and answer_len = 1 in meta.pkl, so
train.py counts the loss of the answer only.

  python data/parity/prepare.py --length=64 --min_bits=2 --max_bits=16 --out_dir=data/parity/short
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenizers import ByteTokenizer  # noqa: E402
from data.writing import example_splits, make_examples, parse_flags, seeded_rng, write_dataset  # noqa: E402

PAD = ' '


def make_parity(length, n_bits, rng):
    """One example of exactly `length` byte ids: (prompt_ids, answer_ids), the answer being '0' or '1'."""
    if not 1 <= n_bits <= length - 2:
        raise ValueError(f'{n_bits} bits do not fit in {length} tokens with "=" and the answer '
                         f'(at most {length - 2})')
    bits = rng.integers(0, 2, size=n_bits)
    prompt = PAD * (length - n_bits - 2) + ''.join(map(str, bits)) + '='
    tok = ByteTokenizer()
    return tok.encode(prompt), tok.encode(str(int(bits.sum()) % 2))


def main(argv=None):
    def own_flags(parser):
        parser.add_argument('--length', type=int, default=64, help='tokens per example (prompt + answer)')
        parser.add_argument('--min_bits', type=int, default=1)
        parser.add_argument('--max_bits', type=int, default=0, help='0 = as many as fit')
    args = parse_flags(argv, __doc__, own_flags, os.path.dirname(os.path.abspath(__file__)), examples=(50000, 1000))
    max_bits = args.max_bits or args.length - 2
    if not 1 <= args.min_bits <= max_bits:
        fit = f' (0 = as many as fit in --length={args.length})' if not args.max_bits else ''
        raise SystemExit(f'--min_bits={args.min_bits} must be between 1 and --max_bits={max_bits}{fit}')
    rng = seeded_rng(args.seed)

    def make_set(n):  # a uniform number of bits in [min_bits, max_bits] per example
        return make_examples(lambda n_bits: make_parity(args.length, int(n_bits), rng),
                             rng.integers(args.min_bits, max_bits + 1, size=n))
    train_ids, val_ids = example_splits(make_set, args)
    write_dataset(args.out_dir, train_ids, val_ids, ByteTokenizer(), 'parity', example_len=args.length, answer_len=1)


if __name__ == '__main__':
    main()
