"""Regenerates `tiny_tokenizer.json`: a byte-level BPE (vocab 2048) trained on the stdlib.

    python -m v4jax.assets.make_tiny_tokenizer   # writes v4jax/assets/tiny_tokenizer.json

Training text is `v4jax.data.stdlib_texts(TRAIN_BYTES)` (the first bytes of the running
interpreter's stdlib `*.py` files in sorted order), so the output is byte-identical for a
given Python version and `tokenizers` version. Ids 0 and 1 are DeepSeek's bos / eos.
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from v4jax.data import stdlib_texts
from v4jax.tokenizer import BOS_TOKENS, EOS_TOKENS, TINY_TOKENIZER

VOCAB_SIZE = 2048
TRAIN_BYTES = 8_000_000


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS_TOKENS[0], EOS_TOKENS[0]],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(TRAIN_BYTES), trainer=trainer)
    return tok


if __name__ == "__main__":
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded training: reproducible
    build().save(TINY_TOKENIZER, pretty=False)
    print(f"wrote {TINY_TOKENIZER}")
