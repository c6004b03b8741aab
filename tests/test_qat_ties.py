"""The near-tie search of ``eval.py qat-ties`` (``v4jax.qat_ties``) without the golden data: a reference
that rounds one planted value the other way is explained by exactly that value."""
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from v4jax import qat_ties
from v4jax.model.transformer import Transformer


def test_resolve_finds_a_planted_rounding():
    model = Transformer(small_config(), mode="qat", rngs=nnx.Rngs(0))
    S = 24
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, S + 1), 0, model.cfg.vocab_size))
    res = qat_ties.Resolver(model, tokens, S, mtp=True)
    prefill, mtp, inputs = res.run([])
    # the reference: row 1 rounds a value entering position 10 to its other neighbour (the one nearest
    # to a midpoint among those that change the logits: some feed nothing, e.g. an unselected key)
    for planted in res.near_ties(inputs, 1, 10, delta=0.1):
        ref_prefill, ref_mtp, _ = res.run([planted])
        e = np.maximum(qat_ties.rel_errors(ref_prefill, prefill), qat_ties.rel_errors(ref_mtp, mtp))
        if e[1, 10] > 1e-5:
            break
    assert e[0].max() == 0 and e[1, :10].max() == 0 and e[1, 10] > 1e-5  # rows independent, causal

    ties, got_prefill, got_mtp = qat_ties.resolve(model, tokens, ref_prefill, ref_mtp, delta=0.1)
    assert [(t.b, t.pos, t.value, t.rounded) for t in ties] == [(1, 10, planted.value, planted.rounded)]
    np.testing.assert_array_equal(got_prefill, ref_prefill)
    np.testing.assert_array_equal(got_mtp, ref_mtp)

    # the exact-mode forward is not a rounding away: every position of both rows disagrees
    with pytest.raises(qat_ties.Unexplained, match="disagrees from position 0 on"):
        exact = Transformer(small_config(), mode="exact", rngs=nnx.Rngs(0))
        qat_ties.resolve(model, tokens, np.asarray(exact(tokens[:, :S])[0]), delta=1e-5)
