"""Decoding options (captioning/decoding.py): n-best lists, sampling with temperature and top-k,
a minimum length and <unk> suppression, in greedy decoding, sampling and beam search, and through
the Captioner API. Tiny random models (tests/test_beam_search.py's), one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from captioning.decoding import check_options, decode, decode_n_best, sample_words
from captioning.vocab import Vocabulary, banned_ids
from test_beam_search import MODES, build_model, random_features, teacher_forced

pytestmark = pytest.mark.usefixtures("seed", "one_thread")


def lengths_of(decoded) -> list[int]:
    return decoded.lengths.tolist()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_min_len_forbids_end_before_that_many_words(beam_size):
    # A strong <end> bias: without min_len most captions stop after a word or two.
    model = build_model(end_bias=6.0)
    features, mask = random_features(6)
    images = features  # the model passes annotation grids [B, L, D] through its encoder
    free = decode(model, images, beam_size=beam_size, max_len=8)
    assert min(lengths_of(free)) < 4
    held = decode(model, images, beam_size=beam_size, max_len=8, min_len=4)
    assert min(lengths_of(held)) >= 4
    assert (held.scores < free.scores + 1e-5).all()  # a constrained search never scores higher


@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_unk_never_emits_unk(beam_size):
    model = build_model()
    with torch.no_grad():
        model.decoder.L_o.bias[Vocabulary.unk_id] += 8.0  # <unk> is now the likeliest word
    features, _ = random_features(5)
    plain = decode(model, features, beam_size=beam_size, max_len=6)
    assert (plain.tokens == Vocabulary.unk_id).any()
    clean = decode(model, features, beam_size=beam_size, max_len=6, no_unk=True)
    assert not (clean.tokens == Vocabulary.unk_id).any()
    assert (clean.lengths > 0).all()


@pytest.mark.parametrize("attention,mode", MODES)
def test_n_best_is_the_beams_best_hypotheses_with_their_scores_and_attention(attention, mode):
    model = build_model(model__attention=attention)
    features, mask = random_features(4)
    pools = decode_n_best(model, features, n_best=3, beam_size=4, max_len=6, mode=mode)
    best = decode(model, features, beam_size=4, max_len=6, mode=mode)
    for b, pool in enumerate(pools):
        assert len(pool) == 3
        assert pool[0].tokens == best.tokens[b, : best.lengths[b]].tolist()
        assert len({tuple(h.tokens) for h in pool}) == 3  # distinct
        scores = [h.score for h in pool]
        assert scores == sorted(scores, reverse=True)  # length_penalty 0: the key is the score
        for h in pool:  # each score is the teacher-forced log p of its words and <end>
            total, alphas = teacher_forced(model, features[b], torch.ones(features.shape[1], dtype=torch.bool),
                                           h.tokens, mode)
            assert h.score == pytest.approx(total, abs=1e-4)
            torch.testing.assert_close(h.alphas, alphas)


def test_sampling_draws_by_seed_and_top_k_1_is_greedy():
    model = build_model(sharpen=0.3)  # flat word distributions: draws differ
    features, _ = random_features(8)
    greedy = decode(model, features, max_len=6)
    top1 = decode(model, features, max_len=6, top_k=1, temperature=2.0)
    assert torch.equal(top1.tokens, greedy.tokens)
    torch.manual_seed(1)
    a = decode(model, features, max_len=6, temperature=1.5)
    torch.manual_seed(1)
    b = decode(model, features, max_len=6, temperature=1.5)
    torch.manual_seed(2)
    c = decode(model, features, max_len=6, temperature=1.5)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, greedy.tokens)
    for b_ in range(8):  # sampled captions are scored by the model's own log p, untempered
        n = int(a.lengths[b_])
        total, _ = teacher_forced(model, features[b_], torch.ones(features.shape[1], dtype=torch.bool),
                                  a.tokens[b_, :n].tolist(), "expected")
        assert float(a.scores[b_]) == pytest.approx(total, abs=1e-4)


def test_sample_words_respects_top_k_and_temperature():
    torch.manual_seed(0)
    log_p = torch.tensor([[0.0, -1.0, -2.0, -3.0, float("-inf")]]).log_softmax(-1).repeat(4000, 1)
    drawn = sample_words(log_p, temperature=1.0, top_k=2)
    assert set(drawn.tolist()) == {0, 1}
    freq0 = (drawn == 0).float().mean().item()
    assert freq0 == pytest.approx(1 / (1 + torch.e ** -1), abs=0.03)  # p(0) / (p(0) + p(1))
    hot = sample_words(log_p, temperature=100.0)
    assert set(hot.tolist()) == {0, 1, 2, 3}  # never the banned (-inf) word
    cold = sample_words(log_p, temperature=0.01)
    assert set(cold.tolist()) == {0}


def test_n_best_samples_are_distinct_and_ranked():
    model = build_model(sharpen=0.3)
    features, _ = random_features(3)
    torch.manual_seed(0)
    pools = decode_n_best(model, features, n_best=6, max_len=6, temperature=1.0)
    for pool in pools:
        assert 1 <= len(pool) <= 6
        assert len({tuple(h.tokens) for h in pool}) == len(pool)
        assert [h.score for h in pool] == sorted((h.score for h in pool), reverse=True)
        assert all(h.alphas.shape == (len(h.tokens), features.shape[1]) for h in pool)
    assert max(len(pool) for pool in pools) > 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(beam_size=3, temperature=0.7), "cannot use a beam"),
    (dict(n_best=3, beam_size=2), "needs a beam at least as wide"),
    (dict(temperature=0.0), "temperature must be a positive number"),
    (dict(temperature=-1.0), "temperature must be a positive number"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(min_len=9, max_len=8), "min_len 9 is above max_len 8"),
    (dict(min_len=-1), "min_len must be a non-negative integer"),
])
def test_bad_option_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        check_options(**kwargs)
    assert "\n" not in str(err.value)


def test_check_options_names_the_method():
    assert check_options() == "greedy"
    assert check_options(beam_size=3, n_best=2) == "beam"
    assert check_options(top_k=5, n_best=4) == "sample"


def test_banned_ids():
    assert banned_ids(0) == [Vocabulary.pad_id, Vocabulary.start_id]
    assert Vocabulary.end_id in banned_ids(2, min_len=3) and Vocabulary.end_id not in banned_ids(3, min_len=3)
    assert Vocabulary.unk_id in banned_ids(5, no_unk=True)


def test_hard_attention_keeps_where_each_word_looked():
    model = build_model(model__attention="hard")
    features, _ = random_features(4)
    argmax = decode(model, features, max_len=6, mode="argmax")
    assert argmax.locations is not None and argmax.locations.shape == argmax.tokens.shape
    for b in range(4):
        n = int(argmax.lengths[b])
        assert argmax.locations[b, :n].tolist() == argmax.alphas[b, :n].argmax(-1).tolist()
        assert (argmax.locations[b, n:] == -1).all()
    torch.manual_seed(0)
    sampled = decode_n_best(model, features, n_best=2, max_len=6, mode="sample", temperature=1.0)
    for pool in sampled:
        for h in pool:
            assert len(h.locations) == len(h.tokens)
            assert all(h.alphas[t, loc] > 0 for t, loc in enumerate(h.locations))
    assert decode(model, features, max_len=6, mode="expected").locations is None
