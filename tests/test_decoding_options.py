"""Decoding options (captioning/search.py's DecodeOptions): n-best lists, sampling with temperature
and top-k, a minimum length and <unk> suppression, in greedy decoding, sampling and beam search;
the options' checks and defaults; the one search loop over torch and over NumPy. Tiny random
models (tests/test_beam_search.py's), one intra-op thread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captioning.config import DecodeConfig
from captioning.decoding import Decoded, ModelSearch, TorchOps, best_captions, sample_words
from captioning.export.runtime import NumpyOps
from captioning.search import DecodeOptions, Hypothesis, StepResult, search
from captioning.vocab import Vocabulary, banned_ids
from test_beam_search import MODES, build_model, random_features, teacher_forced

pytestmark = pytest.mark.usefixtures("seed", "one_thread")


def n_best(model, images, mode: str = "expected", **options) -> list[list[Hypothesis]]:
    return ModelSearch(model)(images, DecodeOptions(hard_mode=mode, **options))


def decode(model, images, mode: str = "expected", **options) -> Decoded:
    """The best caption of each image (images: pixels, or annotation grids [B, L, D])."""
    return best_captions(n_best(model, images, mode, **options))


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
    pools = n_best(model, features, n_best=3, beam_size=4, max_len=6, mode=mode)
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
    pools = n_best(model, features, n_best=6, max_len=6, temperature=1.0)
    for pool in pools:
        assert 1 <= len(pool) <= 6
        assert len({tuple(h.tokens) for h in pool}) == len(pool)
        assert [h.score for h in pool] == sorted((h.score for h in pool), reverse=True)
        assert all(h.alphas.shape == (len(h.tokens), features.shape[1]) for h in pool)
    assert max(len(pool) for pool in pools) > 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(beam_size=3, temperature=0.7), "cannot use a beam"),
    (dict(n_best=3, beam_size=2), "needs a beam at least as wide"),
    (dict(temperature=0.0), "temperature must be a number from 0.01 to 100"),
    (dict(temperature=-1.0), "temperature must be a number from 0.01 to 100"),
    (dict(temperature=1e-45), "temperature must be a number from 0.01 to 100"),
    (dict(temperature=1e300), "temperature must be a number from 0.01 to 100"),
    (dict(temperature=float("nan")), "temperature must be a number from 0.01 to 100"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(min_len=9, max_len=8), "min_len 9 is above max_len 8"),
    (dict(min_len=-1), "min_len must be a non-negative integer"),
    (dict(beam_size=0), "beam_size must be a positive integer"),
    (dict(max_len=True), "max_len must be a positive integer"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(hard_mode="glance"), "hard_mode must be one of expected, argmax, sample"),
])
def test_bad_options_are_one_line_errors_where_they_are_built(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        DecodeOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_options_name_their_method():
    assert DecodeOptions().method == "greedy"
    assert DecodeOptions(beam_size=3, n_best=2).method == "beam"
    assert DecodeOptions(top_k=5, n_best=4).method == "sample"
    with pytest.raises(ValueError, match="cannot use a beam"):  # a changed copy is checked again
        DecodeOptions().replace(temperature=1.0, beam_size=2)


def test_options_for_a_model_take_its_defaults():
    defaults = DecodeConfig(max_len=12, beam_size=3, length_penalty=0.5, hard_mode="argmax")
    hard = ("expected", "argmax", "sample")
    assert DecodeOptions.for_model(defaults, hard, "hard") == DecodeOptions(beam_size=3, max_len=12, length_penalty=0.5,
                                                                              hard_mode="argmax")
    assert DecodeOptions.for_model(defaults, hard, "hard", n_best=5).beam_size == 5  # widened to n_best
    assert DecodeOptions.for_model(defaults, hard, "hard", temperature=0.5).beam_size == 1  # sampling
    assert DecodeOptions.for_model(defaults, (), "soft").hard_mode is None
    assert DecodeOptions.for_model(defaults, (), "soft", hard_mode="expected").hard_mode is None
    assert DecodeOptions.for_model(defaults, ("expected",), "hard").hard_mode == "expected"  # argmax not offered
    with pytest.raises(ValueError, match="needs a hard-attention model; this one uses soft attention"):
        DecodeOptions.for_model(defaults, (), "soft", hard_mode="argmax")
    with pytest.raises(ValueError, match="hard_mode must be one of argmax .what this model offers., got 'sample'"):
        DecodeOptions.for_model(defaults, ("argmax",), "hard", hard_mode="sample")
    given = DecodeOptions(beam_size=2, hard_mode="sample")
    assert DecodeOptions.for_model(defaults, hard, "hard", given) is given
    with pytest.raises(ValueError, match="not offered by this model's soft attention"):
        DecodeOptions.for_model(defaults, (), "soft", given)
    with pytest.raises(ValueError, match="not both"):
        DecodeOptions.for_model(defaults, hard, "hard", given, beam_size=3)
    # Options without a hard mode decode, and are recorded, with the model's own.
    assert DecodeOptions.for_model(defaults, hard, "hard", DecodeOptions(beam_size=1)).hard_mode == "argmax"
    assert DecodeOptions.for_model(defaults, ("expected",), "hard", DecodeOptions()).hard_mode == "expected"
    record = DecodeOptions.for_model(defaults, hard, "hard").record("hard")
    assert record == {"method": "beam", "beam_size": 3, "length_penalty": 0.5, "max_len": 12, "hard_mode": "argmax",
                      "attention": "hard", "n_best": 1, "temperature": None, "top_k": None, "min_len": 0,
                      "no_unk": False}


class TableStep:
    """A step whose next-word log-probabilities come from a fixed random table indexed by the
    previous word and the image, in torch or in NumPy (the two engines' arrays)."""

    def __init__(self, ops, to_array, images: int, vocab: int = 9, locations: int = 5, seed: int = 0) -> None:
        gen = np.random.default_rng(seed)
        self.ops, self.to_array, self.images = ops, to_array, images
        self.table = to_array((gen.normal(size=(images, vocab, vocab)) * 2.0).astype(np.float32))
        self.alpha = to_array(gen.dirichlet(np.ones(locations), size=(images, vocab)).astype(np.float32))

    def start(self):
        return self.ops.arange(self.images)  # the state: each row's image

    def select(self, image, rows):
        return image[rows]


class TorchTable(TableStep):
    def __init__(self, images: int, seed: int = 0) -> None:
        super().__init__(TorchOps(torch.device("cpu")), torch.from_numpy, images, seed=seed)

    def __call__(self, words, image):
        return StepResult(self.table[image, words].log_softmax(-1), image, self.alpha[image, words], None)


class NumpyTable(TableStep):
    def __init__(self, images: int, seed: int = 0) -> None:
        super().__init__(NumpyOps(np.random.default_rng(0)), np.asarray, images, seed=seed)

    def __call__(self, words, image):
        x = self.table[image, words]
        top = x.max(-1, keepdims=True)
        log_p = (x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))).astype(np.float32)
        return StepResult(log_p, image, self.alpha[image, words], None)


@pytest.mark.parametrize("options", [
    DecodeOptions(max_len=7), DecodeOptions(beam_size=3, max_len=7), DecodeOptions(beam_size=4, n_best=3, max_len=7),
    DecodeOptions(beam_size=3, max_len=7, min_len=3, no_unk=True, length_penalty=0.7),
    DecodeOptions(beam_size=1, max_len=7, min_len=5),
])
def test_one_search_loop_gives_the_same_captions_over_torch_and_numpy(options):
    """The same search (captioning/search.py) over the same step in the two engines' arrays:
    the same hypotheses, in the same order, with the same scores and attention."""
    for seed in range(3):
        over_torch = search(TorchTable(6, seed), 6, options)
        over_numpy = search(NumpyTable(6, seed), 6, options)
        assert [[h.tokens for h in pool] for pool in over_torch] == [[h.tokens for h in pool] for pool in over_numpy]
        assert any(len(pool[0].tokens) for pool in over_torch)
        for tp, npool in zip(over_torch, over_numpy):
            for t, n in zip(tp, npool):
                assert t.ended == n.ended and t.score == pytest.approx(n.score, abs=1e-5)
                np.testing.assert_allclose(t.alphas.numpy(), n.alphas, atol=1e-6)


def test_numpy_sampling_respects_top_k_and_temperature():
    ops = NumpyOps(np.random.default_rng(0))
    log_p = np.log(np.array([[0.5, 0.3, 0.15, 0.05, 0.0]], np.float32).repeat(4000, 0) + 1e-30)
    log_p[:, 4] = -math.inf
    drawn = ops.sample(log_p, 1.0, 2)
    assert set(drawn.tolist()) == {0, 1}
    assert (drawn == 0).mean() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(ops.sample(log_p, 100.0, None).tolist()) == {0, 1, 2, 3}  # never the banned word
    assert set(ops.sample(log_p, 0.01, None).tolist()) == {0}
    again = NumpyOps(np.random.default_rng(0)).sample(log_p, 1.0, 2)
    assert (again == drawn).all()  # a seeded generator repeats its draws


def test_banned_ids():
    assert banned_ids(0) == [Vocabulary.pad_id, Vocabulary.start_id]
    assert Vocabulary.end_id in banned_ids(2, min_len=3) and Vocabulary.end_id not in banned_ids(3, min_len=3)
    assert Vocabulary.unk_id in banned_ids(5, no_unk=True)


def test_hard_attention_keeps_where_each_word_looked():
    model = build_model(model__attention="hard")
    features, _ = random_features(4)
    argmax = n_best(model, features, max_len=6, mode="argmax")
    for [h] in argmax:
        assert h.locations is not None and len(h.locations) == len(h.tokens)
        assert h.locations == h.alphas.argmax(-1).tolist()
    torch.manual_seed(0)
    sampled = n_best(model, features, n_best=2, max_len=6, mode="sample", temperature=1.0)
    for pool in sampled:
        for h in pool:
            assert len(h.locations) == len(h.tokens)
            assert all(h.alphas[t, loc] > 0 for t, loc in enumerate(h.locations))
    assert all(h.locations is None for [h] in n_best(model, features, max_len=6, mode="expected"))
