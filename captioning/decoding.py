"""Caption generation: real decoding (each word fed back), never teacher-forced argmax.

One implementation serves validation, evaluation, the caption CLI, the API and the demo:

* greedy decoding (the most likely word at each step) and sampling (a word drawn from the
  softmax at ``temperature``, among the ``top_k`` most likely words) share one loop, which only
  picks the next word differently (:func:`greedy_decode_features`);
* beam search keeps the ``beam_size`` best partial captions (:func:`beam_search`); its ``n_best``
  finished hypotheses come from :func:`decode_n_best`, as do ``n_best`` samples per image;
* every loop restricts the vocabulary the same way (:func:`captioning.vocab.banned_ids`): never
  <pad> or <start>, no <end> before ``min_len`` words, and no <unk> with ``no_unk``.

Scores are always the model's own log-probabilities (temperature and top-k change which word is
drawn, not how it is scored), so sampled and beam captions rank on one scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple

import torch

from captioning.models.captioner import ShowAttendTell
from captioning.models.decoder import DecoderState
from captioning.vocab import Vocabulary, banned_ids

if TYPE_CHECKING:
    from captioning.config import Config

#: How a hard-attention model attends at test time (Sec. 4.2): the expected context, the most
#: likely location, or a sampled one. A soft model always uses the expected context.
HARD_MODES = ("expected", "argmax", "sample")


def decode_settings(config: "Config", max_len: int | None = None, hard_mode: str | None = None,
                    beam_size: int | None = None, *, n_best: int = 1, temperature: float | None = None,
                    top_k: int | None = None, min_len: int = 0, no_unk: bool = False) -> dict:
    """The decoding settings a model of ``config`` uses with these overrides (validated).

    The one description of how captions are decoded, recorded beside every score: validation,
    ``captioning evaluate``, the study and the Python API all build it here. A hard-attention
    model attends with ``config.decode.hard_mode`` unless ``hard_mode`` is given; a soft one always
    uses the expected context (``hard_mode`` None in the result; asking it for "argmax" or
    "sample" is a ValueError). A ``temperature`` or ``top_k`` samples (``beam_size`` then defaults
    to 1); ``n_best`` captions come from a beam at least as wide (the default beam widens to it),
    or from that many draws. Bad combinations raise ValueError (:func:`check_options`).
    """
    if max_len is None:
        max_len = config.decode.max_len
    sampling = temperature is not None or top_k is not None
    if beam_size is None:
        beam_size = 1 if sampling else config.decode.beam_size
        if isinstance(n_best, int) and not sampling:
            beam_size = max(beam_size, n_best)
    if hard_mode is not None and hard_mode not in HARD_MODES:
        raise ValueError(f"hard_mode must be one of {', '.join(HARD_MODES)}, got {hard_mode!r}")
    method = check_options(max_len, beam_size, n_best, min_len, temperature, top_k)
    if config.model.attention == "hard":
        mode = hard_mode or config.decode.hard_mode
    elif hard_mode not in (None, "expected"):
        raise ValueError(f"hard_mode {hard_mode!r} needs a hard-attention model; this one uses "
                         f"{config.model.attention} attention")
    else:
        mode = None
    return {"method": method, "beam_size": beam_size,
            "length_penalty": config.decode.length_penalty if method == "beam" else None,
            "max_len": int(max_len), "hard_mode": mode, "attention": config.model.attention,
            "n_best": n_best, "temperature": temperature, "top_k": top_k, "min_len": min_len,
            "no_unk": bool(no_unk)}


#: The options of :func:`decode_settings` beyond beam size, length and hard mode, as keyword arguments.
OPTION_KEYS = ("n_best", "temperature", "top_k", "min_len", "no_unk")


def settings_options(settings: Mapping, n_best: bool = True) -> dict:
    """A settings dict of :func:`decode_settings` -> its options as keyword arguments (those it
    holds: a dict recorded before the options existed has none). ``n_best=False`` leaves the
    n-best count out (scoring takes the best caption only)."""
    return {k: settings[k] for k in OPTION_KEYS if k in settings and (n_best or k != "n_best")}


class Decoded(NamedTuple):
    tokens: torch.Tensor  # [B, T] long word ids, <end> excluded, padded with <pad>
    lengths: torch.Tensor  # [B] long, number of words
    alphas: torch.Tensor  # [B, T, L] attention of each emitted word (zeros past the length)
    scores: torch.Tensor  # [B] sum of log p(word) over the words and <end>
    ended: torch.Tensor  # [B] bool, False if max_len was reached without <end>
    # [B, T] long: the location hard attention looked at for each word ("argmax"/"sample" modes;
    # -1 past the length). None for soft or expected attention, and from beam search.
    locations: torch.Tensor | None = None


class Hypothesis(NamedTuple):
    """One caption of an n-best list."""

    tokens: list[int]  # word ids, <end> excluded
    alphas: torch.Tensor  # [len(tokens), L] attention of each word
    score: float  # sum of log p(word) over the words and <end>
    ended: bool  # False if force-ended at max_len
    locations: list[int] | None = None  # hard attention's chosen location per word (greedy/sampling)


def check_options(max_len: int = 30, beam_size: int = 1, n_best: int = 1, min_len: int = 0,
                  temperature: float | None = None, top_k: int | None = None) -> str:
    """Validate a combination of decoding options -> the method: "greedy", "beam" or "sample".

    Sampling is asked for by a ``temperature`` or a ``top_k``; it draws ``n_best`` captions per
    image and cannot be combined with a beam. Raises ValueError naming the problem and the fix.
    """
    def positive(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    positive("max_len", max_len)
    positive("beam_size", beam_size)
    positive("n_best", n_best)
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 0:
        raise ValueError(f"min_len must be a non-negative integer, got {min_len!r}")
    if min_len > max_len:
        raise ValueError(f"min_len {min_len} is above max_len {max_len}; lower min_len or raise max_len")
    if top_k is not None:
        positive("top_k", top_k)
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not temperature > 0 or temperature == float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature!r} "
                         "(greedy decoding is beam_size 1 without a temperature)")
    if temperature is not None or top_k is not None:
        if beam_size > 1:
            raise ValueError(f"sampling (temperature/top_k) draws words one by one and cannot use a beam; "
                             f"drop beam_size {beam_size} or the sampling options")
        return "sample"
    if n_best > beam_size:
        raise ValueError(f"n_best {n_best} needs a beam at least as wide (beam_size {beam_size}), "
                         "or sampling (a temperature or top_k) to draw several captions")
    return "greedy" if beam_size == 1 else "beam"


def sample_words(log_p: torch.Tensor, temperature: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """One word per row drawn from softmax(log_p / temperature), restricted to the ``top_k`` most
    likely words (all of them when None). log_p [B, V] (-inf for banned words) -> [B] long."""
    logits = log_p / (1.0 if temperature is None else float(temperature))
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


@torch.no_grad()
def greedy_decode(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    max_len: int = 30,
    mode: str = "expected",
    *,
    min_len: int = 0,
    no_unk: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
) -> Decoded:
    """Batched greedy decoding (or sampling, with a ``temperature`` or ``top_k``).
    images [B, 3, H, W] -> Decoded with T <= max_len.

    ``mode`` is how hard attention attends ("expected", "argmax", "sample"); soft uses "expected".
    The model should be in eval mode (no dropout).
    """
    features, mask = model.encode(images, image_mask)
    return greedy_decode_features(model, features, mask, max_len, mode, min_len=min_len, no_unk=no_unk,
                                  temperature=temperature, top_k=top_k)


@torch.no_grad()
def greedy_decode_features(
    model: ShowAttendTell, features: torch.Tensor, mask: torch.Tensor, max_len: int, mode: str = "expected",
    *, min_len: int = 0, no_unk: bool = False, temperature: float | None = None, top_k: int | None = None,
) -> Decoded:
    """Greedy decoding from annotations features [B, L, D], mask [B, L]; with a ``temperature``
    or ``top_k`` each word is drawn (:func:`sample_words`) instead of taken as the argmax."""
    sampling = temperature is not None or top_k is not None
    decoder = model.decoder
    B = features.shape[0]
    device = features.device
    keys = decoder.project(features)  # (B, L, K), once per image
    state: DecoderState = decoder.init_state(features, mask)
    words = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    scores = torch.zeros(B, device=device)
    tokens, alphas, locations = [], [], []
    natural_end = finished
    for _ in range(max_len + 1):  # max_len words, then one more step that may emit <end>
        out = decoder.step(words, state, features, keys, mask, mode)
        log_p = out.logits.float().log_softmax(-1)  # (B, V)
        log_p[:, banned_ids(len(tokens), min_len, no_unk)] = float("-inf")
        if len(tokens) == max_len:  # out of room: only <end> may follow
            natural_end = finished.clone()
            best = torch.full_like(words, Vocabulary.end_id)
        elif sampling:
            best = sample_words(log_p, temperature, top_k)
        else:
            best = log_p.argmax(-1)  # (B,)
        scores = scores + torch.where(finished, 0.0, log_p.gather(1, best[:, None]).squeeze(1))
        is_end = best == Vocabulary.end_id
        emit = ~finished & ~is_end
        tokens.append(torch.where(emit, best, Vocabulary.pad_id))
        alphas.append(out.attended.alpha * emit[:, None])
        if out.attended.location is not None:
            locations.append(torch.where(emit, out.attended.location, -1))
        finished = finished | is_end
        state, words = out.state, best
        if bool(finished.all()):
            if len(tokens) <= max_len:
                natural_end = finished
            break
    token_t = torch.stack(tokens[:max_len], 1) if tokens[:max_len] else torch.zeros(B, 0, dtype=torch.long, device=device)
    alpha_t = torch.stack(alphas[:max_len], 1) if alphas[:max_len] else features.new_zeros(B, 0, features.shape[1])
    lengths = (token_t != Vocabulary.pad_id).sum(1)
    location_t = torch.stack(locations[:max_len], 1) if locations[:max_len] else None
    return Decoded(token_t, lengths, alpha_t, scores, natural_end, location_t)


# ============================================================================ beam search


class _Hypothesis(NamedTuple):
    key: float  # ranking key: score / (length + 1) ** length_penalty
    score: float  # raw sum of log p over the words and <end>
    tokens: torch.Tensor  # [n] long, <end> excluded
    alphas: torch.Tensor  # [n, L]
    ended: bool  # False if forced to end at max_len


def _ranking_key(score: float, length: int, length_penalty: float) -> float:
    """score / (length + 1) ** length_penalty; the +1 counts <end>. 0 ranks by the plain sum."""
    return score if length_penalty == 0 else score / float(length + 1) ** length_penalty


def decode(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    beam_size: int = 1,
    max_len: int = 30,
    mode: str = "expected",
    length_penalty: float = 0.0,
    *,
    min_len: int = 0,
    no_unk: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
) -> Decoded:
    """The one entry point for generation, one caption per image: beam_size 1 is greedy decoding
    (``length_penalty`` is then unused), a ``temperature`` or ``top_k`` samples, larger beams run
    :func:`beam_search`. Options are checked by :func:`check_options`."""
    method = check_options(max_len, beam_size, 1, min_len, temperature, top_k)
    if method != "beam":
        return greedy_decode(model, images, image_mask, max_len=max_len, mode=mode, min_len=min_len,
                             no_unk=no_unk, temperature=temperature, top_k=top_k)
    return beam_search(model, images, image_mask, beam_size, max_len, mode, length_penalty,
                       min_len=min_len, no_unk=no_unk)


@torch.no_grad()
def decode_n_best(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    n_best: int = 1,
    beam_size: int = 1,
    max_len: int = 30,
    mode: str = "expected",
    length_penalty: float = 0.0,
    *,
    min_len: int = 0,
    no_unk: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
) -> list[list[Hypothesis]]:
    """Up to ``n_best`` captions per image, best first: the beam's best finished hypotheses
    (ranked by the beam's key), or ``n_best`` draws per image when sampling (ranked by score,
    repeated captions dropped, so fewer may come back). Greedy decoding gives one."""
    method = check_options(max_len, beam_size, n_best, min_len, temperature, top_k)
    features, mask = model.encode(images, image_mask)
    B = features.shape[0]
    if method == "beam":
        pools = _beam_search(model, features, mask, beam_size, max_len, mode, length_penalty, min_len, no_unk)
        return [[Hypothesis(h.tokens.tolist(), h.alphas, h.score, h.ended) for h in pool[:n_best]] for pool in pools]
    rows = torch.arange(B, device=features.device).repeat_interleave(n_best)  # n draws per image
    out = greedy_decode_features(model, features[rows], mask[rows], max_len, mode, min_len=min_len,
                                 no_unk=no_unk, temperature=temperature, top_k=top_k)
    lengths, scores, ended = out.lengths.tolist(), out.scores.tolist(), out.ended.tolist()
    result: list[list[Hypothesis]] = []
    for b in range(B):
        seen, hyps = set(), []
        for r in sorted(range(b * n_best, (b + 1) * n_best), key=lambda r: -scores[r]):
            words = out.tokens[r, :lengths[r]].tolist()
            if tuple(words) not in seen:
                seen.add(tuple(words))
                where = None if out.locations is None else out.locations[r, :lengths[r]].tolist()
                hyps.append(Hypothesis(words, out.alphas[r, :lengths[r]], scores[r], ended[r], where))
        result.append(hyps)
    return result


@torch.no_grad()
def beam_search(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    beam_size: int = 5,
    max_len: int = 30,
    mode: str = "expected",
    length_penalty: float = 0.0,
    *,
    min_len: int = 0,
    no_unk: bool = False,
) -> Decoded:
    """Batched beam search. images [B, 3, H, W] -> the best finished hypothesis of each image.

    Hypotheses are ranked by ``score / (length + 1) ** length_penalty`` (length counts the words,
    +1 for <end>); 0 ranks by the plain sum of log-probabilities, > 0 favours longer captions.
    ``Decoded.scores`` is always the raw sum of log p over the words and <end>. A caption that
    reached ``max_len`` words without <end> is force-ended (log p(<end>) added, ``ended`` False).
    With beam_size 1 and length_penalty 0 the result equals :func:`greedy_decode`'s.
    The model should be in eval mode (no dropout).
    """
    features, mask = model.encode(images, image_mask)
    return beam_search_features(model, features, mask, beam_size, max_len, mode, length_penalty,
                                min_len=min_len, no_unk=no_unk)


@torch.no_grad()
def beam_search_all(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    beam_size: int = 5,
    max_len: int = 30,
    mode: str = "expected",
    length_penalty: float = 0.0,
    *,
    min_len: int = 0,
    no_unk: bool = False,
) -> list[list[tuple[list[int], float]]]:
    """Like :func:`beam_search`, but every image's finished hypotheses (up to ``beam_size``), best
    first by the ranking key, as (word ids without <end>, raw score) pairs."""
    features, mask = model.encode(images, image_mask)
    return beam_search_all_features(model, features, mask, beam_size, max_len, mode, length_penalty,
                                    min_len=min_len, no_unk=no_unk)


@torch.no_grad()
def beam_search_all_features(
    model: ShowAttendTell,
    features: torch.Tensor,
    mask: torch.Tensor,
    beam_size: int,
    max_len: int,
    mode: str = "expected",
    length_penalty: float = 0.0,
    *,
    min_len: int = 0,
    no_unk: bool = False,
) -> list[list[tuple[list[int], float]]]:
    """:func:`beam_search_all` from annotations features [B, L, D], mask [B, L]."""
    pools = _beam_search(model, features, mask, beam_size, max_len, mode, length_penalty, min_len, no_unk)
    return [[(h.tokens.tolist(), h.score) for h in pool] for pool in pools]


@torch.no_grad()
def beam_search_features(
    model: ShowAttendTell,
    features: torch.Tensor,
    mask: torch.Tensor,
    beam_size: int,
    max_len: int,
    mode: str = "expected",
    length_penalty: float = 0.0,
    *,
    min_len: int = 0,
    no_unk: bool = False,
) -> Decoded:
    """Beam search from annotations: features [B, L, D], mask [B, L] -> Decoded.

    tokens are [B, T] with T = min(max_len, longest caption + 1), the width greedy_decode gives.
    """
    B, L = features.shape[0], features.shape[1]
    device = features.device
    pools = _beam_search(model, features, mask, beam_size, max_len, mode, length_penalty, min_len, no_unk)
    best = [pool[0] for pool in pools]
    lengths = torch.tensor([h.tokens.numel() for h in best], dtype=torch.long, device=device)
    T = min(max_len, int(lengths.max()) + 1) if B else 0
    tokens = torch.full((B, T), Vocabulary.pad_id, dtype=torch.long, device=device)
    alphas = features.new_zeros(B, T, L)
    for b, h in enumerate(best):
        n = h.tokens.numel()
        tokens[b, :n] = h.tokens
        alphas[b, :n] = h.alphas.to(alphas.dtype)
    scores = torch.tensor([h.score for h in best], dtype=torch.float32, device=device)
    ended = torch.tensor([h.ended for h in best], dtype=torch.bool, device=device)
    return Decoded(tokens, lengths, alphas, scores, ended)


def _beam_search(
    model: ShowAttendTell,
    features: torch.Tensor,
    mask: torch.Tensor,
    beam_size: int,
    max_len: int,
    mode: str,
    length_penalty: float,
    min_len: int = 0,
    no_unk: bool = False,
) -> list[list[_Hypothesis]]:
    """The search itself: per image, its finished hypotheses sorted best first (at most K).

    All B images advance together: the live beams are rows b*K + k of [B*K, ...] tensors. Each
    step scores every extension (sum of log-softmax log-probabilities), keeps the 2K best per
    image, files the <end> extensions among the best K as finished hypotheses and keeps the best
    K others alive. An image is done once it holds K finished hypotheses and no live beam can
    still beat the worst of them; at step max_len every live beam is force-ended.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    decoder = model.decoder
    B, L = features.shape[0], features.shape[1]
    K, V = beam_size, decoder.vocab_size
    device = features.device
    keys = decoder.project(features)  # (B, L, K'), once per image
    # Every image's beams (rows b*K .. b*K+K-1) attend over its one copy of features and keys
    # (grouped attention, captioning/models/attention.py); only the LSTM state is per beam.
    state: DecoderState = decoder.init_state(features, mask)

    words = torch.full((B * K,), Vocabulary.start_id, dtype=torch.long, device=device)
    # Only beam 0 of each image is live at first: otherwise the K copies would yield K duplicates.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=device)  # live beams' words so far
    alphas = features.new_zeros(B * K, 0, L)  # and the attention of each
    base = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each image
    n_cand = min(2 * K, K * V)
    n_row = min(2 * K, V)
    pools: list[list[_Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    def add(b: int, hyp: _Hypothesis) -> None:
        pool = pools[b]
        pool.append(hyp)
        pool.sort(key=lambda h: -h.key)  # stable: on a tie the earlier hypothesis stays ahead
        del pool[K:]

    for t in range(max_len + 1):  # t words so far; step t emits word t+1 or <end>
        if t == 0:  # the K beams of an image are still one: run it once, then copy it K times
            out = decoder.step(words[::K], state, features, keys, mask, mode)
            out = out._replace(logits=out.logits.repeat_interleave(K, dim=0),
                               state=DecoderState(*(x.repeat_interleave(K, dim=0) for x in out.state)),
                               attended=out.attended._replace(alpha=out.attended.alpha.repeat_interleave(K, dim=0)))
        else:
            out = decoder.step(words, state, features, keys, mask, mode)
        log_p = out.logits.float().log_softmax(-1)  # (B*K, V), over the whole vocabulary
        step_alpha = out.attended.alpha  # (B*K, L)

        if t == max_len:  # out of room: every live beam is force-ended
            final = (scores + log_p[:, Vocabulary.end_id].view(B, K)).tolist()
            for b in range(B):
                if done[b]:
                    continue
                for k in range(K):
                    if final[b][k] != float("-inf"):
                        row = b * K + k
                        add(b, _Hypothesis(_ranking_key(final[b][k], t, length_penalty), final[b][k],
                                           tokens[row].clone(), alphas[row].clone(), False))
            break

        log_p[:, banned_ids(t, min_len, no_unk)] = float("-inf")
        # A beam's extensions rank by log p alone, so an image's 2K best are among its beams' own
        # 2K best words: the image-level top-k runs over K x 2K candidates, not K x V.
        row_log_p, row_word = log_p.topk(n_row, dim=1)  # (B*K, 2K)
        cand = (scores[:, :, None] + row_log_p.view(B, K, n_row)).view(B, K * n_row)
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # (B, 2K), sorted best first
        top_beam = torch.div(top_idx, n_row, rounding_mode="floor")  # integer arithmetic only
        top_word = row_word.view(B, K * n_row).gather(1, top_idx)
        is_end = top_word == Vocabulary.end_id

        # <end> among the K best: finished hypotheses (t words + <end>).
        finished = is_end[:, :K] & torch.isfinite(top_scores[:, :K])
        if bool(finished.any()):
            rows = (base + top_beam[:, :K])[finished].tolist()
            fin_scores = top_scores[:, :K][finished].tolist()
            for (b, _), row, s in zip(finished.nonzero().tolist(), rows, fin_scores):
                if not done[b]:
                    add(b, _Hypothesis(_ranking_key(s, t, length_penalty), s,
                                       tokens[row].clone(), alphas[row].clone(), True))

        # The K best extensions that are not <end> stay live (at most K of the 2K are <end>).
        order = (is_end.long() * n_cand + torch.arange(n_cand, device=device)).argsort(dim=1)[:, :K]
        scores = top_scores.gather(1, order)  # (B, K), still sorted
        parent = (base + top_beam.gather(1, order)).view(-1)  # (B*K,) rows of the previous step
        words = top_word.gather(1, order).view(-1)
        tokens = torch.cat([tokens[parent], words[:, None]], dim=1)
        alphas = torch.cat([alphas[parent], step_alpha[parent][:, None]], dim=1)
        state = DecoderState(out.state.h[parent], out.state.c[parent])

        # Done: K finished, and no live beam can still beat the worst of them. Scores only fall;
        # the length divisor is largest at max_len (penalty > 0) or smallest at t+2 (penalty < 0).
        n_best = max_len if length_penalty > 0 else t + 1
        bound = (scores[:, 0] / float(n_best + 1) ** length_penalty).tolist()
        for b in range(B):
            if not done[b] and len(pools[b]) == K and bound[b] <= pools[b][-1].key:
                done[b] = True
        if all(done):
            break

    for b, pool in enumerate(pools):
        if not pool:  # only if no extension was ever finite; keep the output well-formed
            empty = _Hypothesis(float("-inf"), float("-inf"), tokens.new_zeros(0), alphas.new_zeros(0, L), False)
            pool.append(empty)
    return pools
