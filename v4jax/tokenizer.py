"""Tokenizer loading and special-token ids (HF `tokenizers` JSON files).

Works unchanged with a released DeepSeek tokenizer.json and with the tiny byte-level
BPE tokenizer shipped in `v4jax/assets/tiny_tokenizer.json` (vocab 2048, bos=0, eos=1).
"""

from __future__ import annotations

import json
import os

import tokenizers

TINY_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer.json")

# DeepSeek's special tokens use fullwidth bars (U+FF5C) and U+2581; the ASCII spelling is
# accepted as a fallback for hand-made tokenizers.
BOS_TOKENS = ("<｜begin▁of▁sentence｜>", "<|begin▁of▁sentence|>")
EOS_TOKENS = ("<｜end▁of▁sentence｜>", "<|end▁of▁sentence|>")


def load_tokenizer(path: str | None = None) -> tokenizers.Tokenizer:
    """Loads a `tokenizer.json` (default: the shipped tiny tokenizer); clear error if unusable.

    Truncation and padding saved in the file are switched off: a document encodes to all its tokens.
    """
    path = TINY_TOKENIZER if path is None else os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer: file {path!r} does not exist")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception with a parse message
        raise ValueError(f"tokenizer: cannot load {path!r} as a HF tokenizers JSON file: {e}") from e
    if tok.get_vocab_size(with_added_tokens=True) == 0:
        raise ValueError(f"tokenizer: {path!r} has an empty vocabulary")
    tok.no_truncation()
    tok.no_padding()
    return tok


def _config_token(tokenizer_path: str, key: str) -> str | None:
    """Reads `bos_token` / `eos_token` from a `tokenizer_config.json` next to the tokenizer."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # bad JSON or UTF-8
        raise ValueError(f"tokenizer: {cfg_path!r} is not a valid JSON file: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer: {cfg_path!r} holds a {type(config).__name__}, expected a JSON object")
    value = config.get(key)
    if isinstance(value, dict):  # HF AddedToken serialisation: {"content": "...", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_ids(tok: tokenizers.Tokenizer, path: str | None = None) -> tuple[int | None, int | None]:
    """(bos_id, eos_id) of `tok`, or None where they cannot be determined.

    Looks first at `tokenizer_config.json` beside `path` (the HF layout of released
    checkpoints), then for DeepSeek's `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>`.
    """
    path = TINY_TOKENIZER if path is None else os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    ids = []
    for key, names in (("bos_token", BOS_TOKENS), ("eos_token", EOS_TOKENS)):
        candidates = [_config_token(path, key), *names]
        found = [tok.token_to_id(c) for c in candidates if c is not None]
        ids.append(next((i for i in found if i is not None), None))
    return ids[0], ids[1]
