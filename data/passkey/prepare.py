"""
Passkey retrieval, the synthetic long-context test of Landmark Attention and Infini-attention: a 5-digit key is
hidden at some depth in repeated filler text, and the example ends by asking for it:

  The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
  The pass key is 12345. Remember it. 12345 is the pass key.
  The grass is green. ... There and back again. The gr
  What is the pass key? The pass key is 12345

make_passkey builds one example of any length (evaluate.py measures retrieval accuracy with it); this script
writes train/val sets of examples of one length, byte-level, back to back, with example_len in meta.pkl so
train.py samples windows that start at an example.

  python data/passkey/prepare.py --length=1024 --n_train=2000 --n_val=100
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.common import ByteTokenizer, seeded_rng, write_dataset  # noqa: E402

FILLER = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. '
NEEDLE = '\nThe pass key is {key}. Remember it. {key} is the pass key.\n'
QUESTION = '\nWhat is the pass key? The pass key is '


def make_passkey(length, depth, rng, tok):
    """One example of exactly `length` tokens: (prompt_ids, answer_ids), two lists of ints, the answer being the
    key's 5 digits. The needle starts after round(depth * F) filler tokens, F being all the filler there is.
    Pieces are joined as ids, not as text, so the length is exact with any tokenizer (filler may end mid-word)."""
    key = str(rng.integers(10000, 100000))
    needle = tok.encode(NEEDLE.format(key=key))
    question = tok.encode(QUESTION)
    answer = tok.encode(key)
    n_filler = length - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f'a passkey example needs at least {length - n_filler} tokens, asked for length={length}')
    if not 0 <= depth <= 1:
        raise ValueError(f'depth={depth} must be a fraction of the filler, between 0 and 1')
    n_before = round(depth * n_filler)
    filler = np.array(tok.encode(FILLER))
    before = np.resize(filler, n_before)  # np.resize repeats the filler to the size asked for
    after = np.resize(filler, n_filler - n_before)
    prompt = np.concatenate([before, needle, after, question]).astype(np.int64)
    return prompt.tolist(), answer


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
