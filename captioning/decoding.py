"""Caption generation: real decoding (each word fed back), never teacher-forced argmax.

One implementation serves validation, evaluation and the caption CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from captioning.models.captioner import ShowAttendTell
from captioning.models.decoder import DecoderState
from captioning.vocab import Vocabulary

if TYPE_CHECKING:
    from captioning.config import Config

#: How a hard-attention model attends at test time (Sec. 4.2): the expected context, the most
#: likely location, or a sampled one. A soft model always uses the expected context.
HARD_MODES = ("expected", "argmax", "sample")


def decode_settings(config: "Config", max_len: int | None = None, hard_mode: str | None = None,
                    beam_size: int | None = None) -> dict:
    """The decoding settings a model of ``config`` uses with these overrides (validated).

    The one description of how captions are decoded, recorded beside every score: validation,
    ``captioning evaluate``, the study and the Python API all build it here. A hard-attention
    model attends with ``config.decode.hard_mode`` unless ``hard_mode`` is given; a soft one always
    uses the expected context (``hard_mode`` None in the result; asking it for "argmax" or
    "sample" is a ValueError).
    """
    if max_len is None:
        max_len = config.decode.max_len
    if beam_size is None:
        beam_size = config.decode.beam_size
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if hard_mode is not None and hard_mode not in HARD_MODES:
        raise ValueError(f"hard_mode must be one of {', '.join(HARD_MODES)}, got {hard_mode!r}")
    if config.model.attention == "hard":
        mode = hard_mode or config.decode.hard_mode
    elif hard_mode not in (None, "expected"):
        raise ValueError(f"hard_mode {hard_mode!r} needs a hard-attention model; this one uses "
                         f"{config.model.attention} attention")
    else:
        mode = None
    return {"method": "greedy" if beam_size == 1 else "beam", "beam_size": beam_size,
            "length_penalty": config.decode.length_penalty if beam_size > 1 else None,
            "max_len": int(max_len), "hard_mode": mode, "attention": config.model.attention}


class Decoded(NamedTuple):
    tokens: torch.Tensor  # [B, T] long word ids, <end> excluded, padded with <pad>
    lengths: torch.Tensor  # [B] long, number of words
    alphas: torch.Tensor  # [B, T, L] attention of each emitted word (zeros past the length)
    scores: torch.Tensor  # [B] sum of log p(word) over the words and <end>
    ended: torch.Tensor  # [B] bool, False if max_len was reached without <end>


@torch.no_grad()
def greedy_decode(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    max_len: int = 30,
    mode: str = "expected",
) -> Decoded:
    """Batched greedy decoding. images [B, 3, H, W] -> Decoded with T <= max_len.

    ``mode`` is how hard attention attends ("expected", "argmax", "sample"); soft uses "expected".
    The model should be in eval mode (no dropout).
    """
    features, mask = model.encode(images, image_mask)
    return greedy_decode_features(model, features, mask, max_len, mode)


@torch.no_grad()
def greedy_decode_features(
    model: ShowAttendTell, features: torch.Tensor, mask: torch.Tensor, max_len: int, mode: str = "expected"
) -> Decoded:
    decoder = model.decoder
    B = features.shape[0]
    device = features.device
    keys = decoder.project(features)  # (B, L, K), once per image
    state: DecoderState = decoder.init_state(features, mask)
    words = torch.full((B,), Vocabulary.start_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    scores = torch.zeros(B, device=device)
    tokens, alphas = [], []
    natural_end = finished
    for _ in range(max_len + 1):  # max_len words, then one more step that may emit <end>
        out = decoder.step(words, state, features, keys, mask, mode)
        log_p = out.logits.float().log_softmax(-1)  # (B, V)
        log_p[:, Vocabulary.pad_id] = float("-inf")  # never emit padding or <start>
        log_p[:, Vocabulary.start_id] = float("-inf")
        if len(tokens) == max_len:  # out of room: only <end> may follow
            natural_end = finished.clone()
            best = torch.full_like(words, Vocabulary.end_id)
        else:
            best = log_p.argmax(-1)  # (B,)
        scores = scores + torch.where(finished, 0.0, log_p.gather(1, best[:, None]).squeeze(1))
        is_end = best == Vocabulary.end_id
        emit = ~finished & ~is_end
        tokens.append(torch.where(emit, best, Vocabulary.pad_id))
        alphas.append(out.attended.alpha * emit[:, None])
        finished = finished | is_end
        state, words = out.state, best
        if bool(finished.all()):
            if len(tokens) <= max_len:
                natural_end = finished
            break
    token_t = torch.stack(tokens[:max_len], 1) if tokens[:max_len] else torch.zeros(B, 0, dtype=torch.long, device=device)
    alpha_t = torch.stack(alphas[:max_len], 1) if alphas[:max_len] else features.new_zeros(B, 0, features.shape[1])
    lengths = (token_t != Vocabulary.pad_id).sum(1)
    return Decoded(token_t, lengths, alpha_t, scores, natural_end)


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
) -> Decoded:
    """The one entry point for generation: beam_size 1 is greedy decoding (``length_penalty`` is
    then unused), larger beams run :func:`beam_search`."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if beam_size == 1:
        return greedy_decode(model, images, image_mask, max_len=max_len, mode=mode)
    return beam_search(model, images, image_mask, beam_size, max_len, mode, length_penalty)


@torch.no_grad()
def beam_search(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    beam_size: int = 5,
    max_len: int = 30,
    mode: str = "expected",
    length_penalty: float = 0.0,
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
    return beam_search_features(model, features, mask, beam_size, max_len, mode, length_penalty)


@torch.no_grad()
def beam_search_all(
    model: ShowAttendTell,
    images: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    beam_size: int = 5,
    max_len: int = 30,
    mode: str = "expected",
    length_penalty: float = 0.0,
) -> list[list[tuple[list[int], float]]]:
    """Like :func:`beam_search`, but every image's finished hypotheses (up to ``beam_size``), best
    first by the ranking key, as (word ids without <end>, raw score) pairs."""
    features, mask = model.encode(images, image_mask)
    return beam_search_all_features(model, features, mask, beam_size, max_len, mode, length_penalty)


@torch.no_grad()
def beam_search_all_features(
    model: ShowAttendTell,
    features: torch.Tensor,
    mask: torch.Tensor,
    beam_size: int,
    max_len: int,
    mode: str = "expected",
    length_penalty: float = 0.0,
) -> list[list[tuple[list[int], float]]]:
    """:func:`beam_search_all` from annotations features [B, L, D], mask [B, L]."""
    pools = _beam_search(model, features, mask, beam_size, max_len, mode, length_penalty)
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
) -> Decoded:
    """Beam search from annotations: features [B, L, D], mask [B, L] -> Decoded.

    tokens are [B, T] with T = min(max_len, longest caption + 1), the width greedy_decode gives.
    """
    B, L = features.shape[0], features.shape[1]
    device = features.device
    pools = _beam_search(model, features, mask, beam_size, max_len, mode, length_penalty)
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

        log_p[:, Vocabulary.pad_id] = float("-inf")  # never emit padding or <start>
        log_p[:, Vocabulary.start_id] = float("-inf")
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
