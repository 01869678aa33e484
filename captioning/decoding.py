"""Caption generation: real decoding (each word fed back), never teacher-forced argmax.

One implementation serves validation, evaluation and the caption CLI.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from captioning.models.captioner import ShowAttendTell
from captioning.models.decoder import DecoderState
from captioning.vocab import Vocabulary


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
