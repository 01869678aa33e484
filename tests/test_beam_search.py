"""Batched beam search: agreement with greedy decoding at beam size 1, batch independence, scores
that are sums of log-probabilities, sorted distinct hypotheses, and the max_len fallback.

Tiny models on random weights (no downloads), one intra-op thread: each test takes a fraction of a
second. A random encoder maps random images to nearly the same annotations, so most tests decode
from random annotation grids (with some locations masked) through the *_features functions, on a
decoder whose image-side weights are scaled up so that different images get different captions.
The search is captioning/search.py's, over the PyTorch engine's step (captioning/decoding.py).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_captions, make_config, random_images
from captioning import search
from captioning.decoding import Decoded, ModelSearch, best_captions
from captioning.losses import caption_loss
from captioning.models import ShowAttendTell
from captioning.search import DecodeOptions
from captioning.vocab import Vocabulary

pytestmark = pytest.mark.usefixtures("seed", "one_thread")

V = 14  # len(tiny_vocab)
L, D = 16, 128  # the tiny encoder's 4x4 grid of resnet18 layer2 features
MODES = [("soft", "expected"), ("hard", "expected"), ("hard", "argmax")]
SPECIAL_OUT = {Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id}


def build_model(
    seed: int = 0, sharpen: float = 1.0, end_bias: float = 0.0, gain: float = 10.0, **dotted
) -> ShowAttendTell:
    """A tiny random model in eval mode. ``gain`` scales the decoder's image-side weights (so the
    annotations matter), ``sharpen`` the output layer (peakier word distributions), and
    ``end_bias`` is added to the <end> logit (shorter captions)."""
    torch.manual_seed(seed)
    model = ShowAttendTell(make_config(**dotted).model, V).eval()
    dec = model.decoder
    with torch.no_grad():
        for layer in (dec.init_h, dec.init_c, dec.L_z):
            layer.weight.mul_(gain)
        dec.L_o.weight.mul_(sharpen)
        dec.L_o.bias.mul_(sharpen)
        dec.L_o.bias[Vocabulary.end_id] += end_bias
    return model


def random_features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Annotations [n, L, D] (non-negative, like ReLU features) and a mask [n, L] that hides the
    last 0, 3 or 6 locations."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, L, D, generator=gen).relu()
    mask = torch.ones(n, L, dtype=torch.bool)
    for b in range(n):
        mask[b, L - 3 * (b % 3) :] = False
    return features, mask


def beam_pools(model: ShowAttendTell, features: torch.Tensor, mask: torch.Tensor, beam_size: int, max_len: int,
               mode: str = "expected", length_penalty: float = 0.0) -> list[list[search.Hypothesis]]:
    """Every image's finished hypotheses (up to ``beam_size``), best first: the beam search of
    captioning/search.py over the model's step, at any width (1 included)."""
    options = DecodeOptions(beam_size=beam_size, n_best=beam_size, max_len=max_len, length_penalty=length_penalty)
    with torch.no_grad():
        return search.beam_search(ModelSearch(model).step(features, mask, mode), features.shape[0], options)


def beam(model, features, mask, beam_size, max_len, mode="expected", length_penalty=0.0) -> Decoded:
    """The best hypothesis of each image of :func:`beam_pools`, as tensors."""
    return best_captions(beam_pools(model, features, mask, beam_size, max_len, mode, length_penalty))


def beam_scored(*args, **kwargs) -> list[list[tuple[list[int], float]]]:
    """:func:`beam_pools` as (word ids, raw score) pairs."""
    return [scored(pool) for pool in beam_pools(*args, **kwargs)]


def scored(pool: list[search.Hypothesis]) -> list[tuple[list[int], float]]:
    return [(h.tokens, h.score) for h in pool]


def greedy(model, features, mask, max_len, mode="expected") -> Decoded:
    """Greedy decoding (captioning/search.py) from annotations, as tensors."""
    return best_captions(ModelSearch(model).annotations(features, mask, DecodeOptions(max_len=max_len, hard_mode=mode)))


def from_images(model, images, beam_size=1, max_len=6, mode="expected", length_penalty=0.0) -> Decoded:
    """``ModelSearch(model)(images, options)``: the encoder, then the search."""
    options = DecodeOptions(beam_size=beam_size, max_len=max_len, hard_mode=mode, length_penalty=length_penalty)
    return best_captions(ModelSearch(model)(images, options))


def teacher_forced(model: ShowAttendTell, features: torch.Tensor, mask: torch.Tensor, words: list[int], mode: str):
    """One image ([L, D], [L]): sum of log p(w_t | w_<t) over ``words`` + <end>, stepping the
    decoder one word at a time, and the attention [len(words), L] behind each word."""
    decoder = model.decoder
    features, mask = features[None], mask[None]
    with torch.no_grad():
        keys = decoder.project(features)
        state = decoder.init_state(features, mask)
        prev = torch.tensor([Vocabulary.start_id])
        total, alphas = 0.0, []
        for w in [*words, Vocabulary.end_id]:
            out = decoder.step(prev, state, features, keys, mask, mode=mode)
            total += out.logits.float().log_softmax(-1)[0, w].item()
            alphas.append(out.attended.alpha[0])
            prev, state = torch.tensor([w]), out.state
    return total, torch.stack(alphas[:-1]) if words else torch.zeros(0, L)


def assert_same_decoded(a: Decoded, b: Decoded) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.ended, b.ended)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.alphas, b.alphas)


def assert_well_formed(dec: Decoded, B: int, max_len: int, mask: torch.Tensor | None = None) -> None:
    T = dec.tokens.shape[1]
    assert dec.tokens.shape == (B, T) and T <= max_len
    assert dec.alphas.shape == (B, T, L)
    assert dec.lengths.shape == dec.scores.shape == dec.ended.shape == (B,)
    assert dec.tokens.dtype == dec.lengths.dtype == torch.long and dec.ended.dtype == torch.bool
    for b in range(B):
        n = int(dec.lengths[b])
        assert not SPECIAL_OUT & set(dec.tokens[b, :n].tolist())
        assert (dec.tokens[b, n:] == Vocabulary.pad_id).all()
        assert (dec.alphas[b, n:] == 0).all()
        torch.testing.assert_close(dec.alphas[b, :n].sum(-1), torch.ones(n))
        if mask is not None:
            assert (dec.alphas[b, :, ~mask[b]] == 0).all()
        assert bool(dec.ended[b]) or n == max_len
    assert torch.isfinite(dec.scores).all() and (dec.scores <= 0).all()


# ============================================================================ beam size 1 = greedy

# (seed, sharpen, end_bias)
GREEDY_CASES = [(0, 1.0, 1.0), (1, 2.0, 0.0), (2, 3.0, 1.0), (2, 1.0, 0.0), (0, 2.0, 2.0)]


@pytest.mark.parametrize("attention, mode", MODES)
@pytest.mark.parametrize("seed, sharpen, end_bias", GREEDY_CASES)
def test_beam_size_one_is_greedy(attention, mode, seed, sharpen, end_bias):
    model = build_model(seed, sharpen, end_bias, model__attention=attention)
    features, mask = random_features(8, seed)
    greedy_dec = greedy(model, features, mask, 6, mode)
    beam_dec = beam(model, features, mask, 1, 6, mode)
    assert_same_decoded(beam_dec, greedy_dec)
    assert_well_formed(beam_dec, 8, 6, mask)


def test_greedy_cases_cover_mixed_endings():
    """The cases above include batches where some captions end and others run into max_len."""
    mixed = 0
    for seed, sharpen, end_bias in GREEDY_CASES:
        greedy_dec = greedy(build_model(seed, sharpen, end_bias), *random_features(8, seed), 6)
        mixed += int(bool(greedy_dec.ended.any()) and not bool(greedy_dec.ended.all()))
    assert mixed >= 2


@pytest.mark.parametrize("attention, mode", MODES)
def test_beam_size_one_is_greedy_from_images(attention, mode):
    model = build_model(3, 2.0, 1.0, model__attention=attention)
    images = random_images(4, seed=3)
    features, mask = model.encode(images)
    assert_same_decoded(beam(model, features, mask, 1, 5, mode), from_images(model, images, max_len=5, mode=mode))


# ============================================================================ batching


@pytest.mark.parametrize("attention, mode", MODES)
@pytest.mark.parametrize("beam_size", [3, 5])
def test_batch_equals_each_image_alone(attention, mode, beam_size):
    model = build_model(2, 2.0, 0.0, model__attention=attention)
    features, mask = random_features(6, seed=2)
    batch = beam(model, features, mask, beam_size, 6, mode)
    assert_well_formed(batch, 6, 6, mask)
    pools = beam_scored(model, features, mask, beam_size, 6, mode)
    assert len({tuple(tuple(w) for w, _ in pool) for pool in pools}) > 1  # the images differ
    for i in range(6):
        one = (features[i : i + 1], mask[i : i + 1])
        alone = beam(model, *one, beam_size, 6, mode)
        n = int(batch.lengths[i])
        assert int(alone.lengths[0]) == n
        assert torch.equal(alone.tokens[0, :n], batch.tokens[i, :n])
        assert bool(alone.ended[0]) == bool(batch.ended[i])
        torch.testing.assert_close(alone.scores[0], batch.scores[i])
        torch.testing.assert_close(alone.alphas[0, :n], batch.alphas[i, :n])
        pool = beam_scored(model, *one, beam_size, 6, mode)[0]
        assert [w for w, _ in pool] == [w for w, _ in pools[i]]
        assert [s for _, s in pool] == pytest.approx([s for _, s in pools[i]], abs=1e-5)


def test_deterministic():
    model = build_model(4, 2.0, model__attention="hard")
    features, mask = random_features(4, seed=4)
    a = beam(model, features, mask, 4, 6, "argmax")
    b = beam(model, features, mask, 4, 6, "argmax")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)


# ============================================================================ scores


@pytest.mark.parametrize("attention, mode", MODES)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_scores_are_teacher_forced_log_probs(attention, mode, length_penalty):
    """The score is the sum of log-softmax probabilities of the words and <end> (not logits), for
    the returned caption and every finished hypothesis, force-ended ones included; the alphas are
    those behind each returned word."""
    model = build_model(5, 2.0, -0.5, model__attention=attention)
    features, mask = random_features(4, seed=5)
    dec = beam(model, features, mask, 4, 5, mode, length_penalty)
    pools = beam_scored(model, features, mask, 4, 5, mode, length_penalty)
    assert any(not e for e in dec.ended.tolist()) or any(len(w) == 5 for pool in pools for w, _ in pool)
    for i in range(4):
        n = int(dec.lengths[i])
        words = dec.tokens[i, :n].tolist()
        score, alphas = teacher_forced(model, features[i], mask[i], words, mode)
        assert dec.scores[i].item() == pytest.approx(score, abs=1e-4)
        torch.testing.assert_close(dec.alphas[i, :n], alphas)
        assert pools[i][0][0] == words and pools[i][0][1] == pytest.approx(dec.scores[i].item(), abs=1e-5)
        for words, score in pools[i]:
            assert score == pytest.approx(teacher_forced(model, features[i], mask[i], words, mode)[0], abs=1e-4)


def test_scores_from_images_are_teacher_forced_log_probs():
    model = build_model(6, 2.0, 0.5)
    images = random_images(3, seed=6)
    dec = from_images(model, images, beam_size=3, max_len=5)
    features, mask = model.encode(images)
    for i in range(3):
        words = dec.tokens[i, : int(dec.lengths[i])].tolist()
        score, _ = teacher_forced(model, features[i], mask[i], words, "expected")
        assert dec.scores[i].item() == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("attention, mode", MODES)
def test_beam_score_at_least_greedy(seed, attention, mode):
    model = build_model(seed, 1.0 + seed % 3, 0.5 * (seed % 3) - 0.5, model__attention=attention)
    features, mask = random_features(8, seed)
    greedy_dec = greedy(model, features, mask, 8, mode)
    beam_dec = beam(model, features, mask, 5, 8, mode)
    assert (beam_dec.scores >= greedy_dec.scores - 1e-5).all(), (beam_dec.scores, greedy_dec.scores)


def test_beam_finds_better_captions_than_greedy():
    """Not only >=: on these random models beam_dec search does strictly better for some images."""
    better = 0
    for seed in range(3):
        model = build_model(seed, 2.0, 0.0)
        features, mask = random_features(8, seed)
        greedy_dec = greedy(model, features, mask, 8)
        beam_dec = beam(model, features, mask, 5, 8)
        better += int((beam_dec.scores > greedy_dec.scores + 1e-4).sum())
    assert better > 0


# ============================================================================ hypotheses


@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 2.0, -0.5])
@pytest.mark.parametrize("attention, mode", MODES)
def test_hypotheses_sorted_and_distinct(length_penalty, attention, mode):
    model = build_model(6, 2.0, -0.5, model__attention=attention)
    features, mask = random_features(5, seed=6)
    K, max_len = 4, 6
    pools = beam_scored(model, features, mask, K, max_len, mode, length_penalty)
    best = beam(model, features, mask, K, max_len, mode, length_penalty)
    assert_well_formed(best, 5, max_len, mask)
    assert len(pools) == 5
    for i, pool in enumerate(pools):
        assert len(pool) == K  # a full pool: the search ran until K finished or max_len
        keys = [score / (len(words) + 1) ** length_penalty for words, score in pool]
        assert keys == sorted(keys, reverse=True)
        assert len({tuple(words) for words, _ in pool}) == len(pool)  # distinct
        for words, score in pool:
            assert len(words) <= max_len and score <= 0
            assert not SPECIAL_OUT & set(words)
        assert best.tokens[i, : int(best.lengths[i])].tolist() == pool[0][0]
        assert best.scores[i].item() == pytest.approx(pool[0][1], abs=1e-6)


def test_beam_search_all_from_images_matches_features():
    model = build_model(7, 2.0)
    images = random_images(3, seed=7)
    pools = [scored(pool) for pool in ModelSearch(model)(images, DecodeOptions(beam_size=3, n_best=3, max_len=5))]
    assert pools == beam_scored(model, *model.encode(images), 3, 5)
    for i, pool in enumerate(pools):
        assert [s for _, s in pool] == sorted((s for _, s in pool), reverse=True)


def test_length_penalty_favours_longer_captions():
    """With a positive penalty the best caption is never shorter (and its raw score never higher)
    than with plain sums; on this model some get longer."""
    longer = 0
    for seed in range(3):
        model = build_model(seed, 1.0, 0.5)
        features, mask = random_features(8, seed)
        plain = beam(model, features, mask, 5, 8, length_penalty=0.0)
        long = beam(model, features, mask, 5, 8, length_penalty=2.0)
        assert (long.lengths >= plain.lengths).all()
        assert (plain.scores >= long.scores - 1e-5).all()
        longer += int((long.lengths > plain.lengths).sum())
    assert longer > 0


def test_never_emits_pad_or_start():
    model = build_model(8)
    with torch.no_grad():
        model.decoder.L_o.bias[Vocabulary.pad_id] = 100.0
        model.decoder.L_o.bias[Vocabulary.start_id] = 90.0
    features, mask = random_features(3, seed=8)
    dec = beam(model, features, mask, 3, 3)
    assert_well_formed(dec, 3, 3, mask)
    assert dec.lengths.tolist() == [3, 3, 3]  # p(<end>) ~ e^-90: never chosen before max_len
    for pool in beam_scored(model, features, mask, 3, 3):
        assert all(not SPECIAL_OUT & set(w) for w, _ in pool)


# ============================================================================ fallback at max_len


@pytest.mark.parametrize("attention, mode", MODES)
def test_fallback_when_no_beam_ends(attention, mode):
    model = build_model(9, model__attention=attention)
    with torch.no_grad():
        model.decoder.L_o.bias[Vocabulary.end_id] = -1e4
    features, mask = random_features(3, seed=9)
    dec = beam(model, features, mask, 3, 2, mode)
    assert dec.tokens.shape == (3, 2)
    assert dec.lengths.tolist() == [2, 2, 2]
    assert dec.ended.tolist() == [False, False, False]
    assert torch.isfinite(dec.scores).all() and (dec.scores < -1e3).all()  # log p(<end>) included
    assert_well_formed(dec, 3, 2, mask)
    pools = beam_scored(model, features, mask, 3, 2, mode)
    assert all(len(pool) == 3 and all(len(w) == 2 for w, _ in pool) for pool in pools)
    images = random_images(2)
    decoded = from_images(model, images, beam_size=3, max_len=2, mode=mode)
    assert decoded.lengths.tolist() == [2, 2] and decoded.ended.tolist() == [False, False]


def test_immediate_end():
    model = build_model(10)
    with torch.no_grad():
        model.decoder.L_o.weight.zero_()
        model.decoder.L_o.bias.zero_()
        model.decoder.L_o.bias[Vocabulary.end_id] = 10.0
    features, mask = random_features(2, seed=10)
    dec = beam(model, features, mask, 3, 4)
    assert dec.lengths.tolist() == [0, 0] and dec.ended.tolist() == [True, True]
    assert dec.tokens.shape == (2, 0) and dec.alphas.shape == (2, 0, L)
    assert_same_decoded(dec, greedy(model, features, mask, 4))


def test_sample_mode_runs():
    model = build_model(11, 2.0, model__attention="hard")
    features, mask = random_features(3, seed=11)
    dec = beam(model, features, mask, 3, 5, "sample")
    assert_well_formed(dec, 3, 5, mask)


def test_beam_larger_than_vocabulary():
    """K * V candidates fewer than 2K, and fewer real words than beams: still well-formed."""
    model = build_model(12, 2.0)
    features, mask = random_features(2, seed=12)
    dec = beam(model, features, mask, 20, 3)
    assert_well_formed(dec, 2, 3, mask)
    for pool in beam_scored(model, features, mask, 20, 3):
        assert len({tuple(w) for w, _ in pool}) == len(pool) and all(s > float("-inf") for _, s in pool)


# ============================================================================ the method


@pytest.mark.parametrize("attention, mode", MODES)
def test_search_runs_the_method_of_its_options(attention, mode):
    """search.search: beam size 1 is greedy decoding, larger beams the beam search, and the
    encoder runs first from images."""
    model = build_model(12, 2.0, 0.5, model__attention=attention)
    images = random_images(4, seed=12)
    features, mask = model.encode(images)
    assert_same_decoded(from_images(model, images, max_len=6, mode=mode), greedy(model, features, mask, 6, mode))
    assert_same_decoded(from_images(model, images, beam_size=3, max_len=6, mode=mode),
                        beam(model, features, mask, 3, 6, mode))
    assert_same_decoded(from_images(model, images, beam_size=3, max_len=6, mode=mode, length_penalty=0.5),
                        beam(model, features, mask, 3, 6, mode, length_penalty=0.5))


# ============================================================================ a trained model


@pytest.fixture(scope="module")
def overfitted():
    """A tiny model overfitted (100 steps, frozen encoder) to four image -> caption pairs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = make_config(model__encoder__fine_tune_from=None, model__decoder__dropout=0.0)
    model = ShowAttendTell(cfg.model, V)
    rows = [[4, 5, 8], [4, 6, 9, 12, 4, 7], [10, 11], [4, 5, 9, 12, 13]]
    captions = make_captions(rows)
    images = random_images(4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(100):
        out = model(images, captions)
        loss = caption_loss(cfg.loss, out, captions[:, 1:], terms=model.mechanism.loss_terms).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(before)
    return model.eval(), images, rows


def test_overfitted_model_decodes_its_captions(overfitted):
    model, images, rows = overfitted
    greedy_dec = from_images(model, images, max_len=8)
    beam_dec = from_images(model, images, beam_size=5, max_len=8)
    assert beam_dec.ended.all()
    assert (beam_dec.scores >= greedy_dec.scores - 1e-5).all()
    for i, r in enumerate(rows):
        assert beam_dec.tokens[i, : int(beam_dec.lengths[i])].tolist() == r
    assert_same_decoded(beam(model, *model.encode(images), 1, 8), greedy_dec)
    pools = beam_scored(model, *model.encode(images), 5, 8)
    for i, pool in enumerate(pools):
        assert pool[0][0] == rows[i] and len(pool) == 5
        assert [s for _, s in pool] == sorted((s for _, s in pool), reverse=True)
        assert len({tuple(w) for w, _ in pool}) == 5


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_runs_under_bf16_autocast(beam_size):
    """bf16-mixed validation decodes under autocast: the inference attention map runs in bf16."""
    model = ShowAttendTell(make_config().model, 14).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = from_images(model, random_images(2), beam_size=beam_size, max_len=5)
    assert out.tokens.shape[0] == 2 and torch.isfinite(out.scores).all()
    assert torch.allclose(out.alphas.float().sum(-1)[out.tokens != Vocabulary.pad_id], torch.ones(()), atol=0.02)
