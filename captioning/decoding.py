"""Caption generation in PyTorch: real decoding (each word fed back), never teacher-forced argmax.

The search is captioning/search.py's, shared with the ONNX engine; this PyTorch engine supplies
only the model's decoder step and torch's array operations::

    search = ModelSearch(model, fast=True)                       # once per model
    pools = search(images, DecodeOptions(beam_size=3))           # per image: its captions, best first
    decoded = best_captions(pools)                               # the best ones as padded tensors

One implementation serves validation, evaluation, the caption CLI, the API and the demo.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from captioning import fast as fast_path
from captioning.models.captioner import ShowAttendTell
from captioning.models.decoder import DecoderState
from captioning.search import DecodeOptions, Hypothesis, StepResult, search
from captioning.vocab import Vocabulary

__all__ = ["DecodeOptions", "Decoded", "Hypothesis", "ModelSearch", "ModelStep", "best_captions", "sample_words"]


class Decoded(NamedTuple):
    """The best caption of each image of a batch, as tensors."""

    tokens: torch.Tensor  # [B, T] long word ids, <end> excluded, padded with <pad>; T = the longest
    lengths: torch.Tensor  # [B] long, number of words
    alphas: torch.Tensor  # [B, T, L] attention of each emitted word (zeros past the length)
    scores: torch.Tensor  # [B] sum of log p(word) over the words and <end>
    ended: torch.Tensor  # [B] bool, False if max_len was reached without <end>


def sample_words(log_p: torch.Tensor, temperature: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """One word per row drawn from softmax(log_p / temperature), restricted to the ``top_k`` most
    likely words (all of them when None). log_p [B, V] (-inf for banned words) -> [B] long."""
    logits = log_p / (1.0 if temperature is None else float(temperature))
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


class TorchOps:
    """captioning.search.ArrayOps on torch tensors of one device."""

    DTYPES = {"int64": torch.long, "float32": torch.float32, "bool": torch.bool}
    # The library's own functions take the search's arguments as they are.
    sample = staticmethod(sample_words)
    stack = staticmethod(torch.stack)
    cat = staticmethod(torch.cat)
    where = staticmethod(torch.where)
    isfinite = staticmethod(torch.isfinite)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def full(self, shape, value, dtype):
        return torch.full(shape, value, dtype=self.DTYPES[dtype], device=self.device)

    def arange(self, n):
        return torch.arange(n, device=self.device)

    def topk(self, x, k):
        return x.topk(k, dim=-1)

    def gather(self, x, index):
        return x.gather(-1, index)

    def argsort(self, x):
        return x.argsort(dim=-1)

    def nonzero(self, x):
        return x.nonzero().tolist()

    def repeat(self, x, k):
        return x.repeat_interleave(k, dim=0)


class ModelStep:
    """captioning.search.Step over ``model``'s decoder: the projection ``W a`` once per image, whose
    rows share its annotations (grouped attention, captioning/models/attention.py); only the LSTM
    state is per row. ``step``: the decoder's step in captioning/fast.py's form, or None for its own."""

    def __init__(self, model: ShowAttendTell, features: torch.Tensor, mask: torch.Tensor, mode: str,
                 step=None) -> None:
        self.decoder, self.features, self.mask, self.mode = model.decoder, features, mask, mode
        self.decoder_step = step or model.decoder.step
        self.keys = self.decoder.project(features)  # (B, L, K), once per image
        self.ops = TorchOps(features.device)

    def start(self) -> DecoderState:
        return self.decoder.init_state(self.features, self.mask)

    def __call__(self, words: torch.Tensor, state: DecoderState) -> StepResult:
        out = self.decoder_step(words, state, self.features, self.keys, self.mask, mode=self.mode)
        return StepResult(out.logits.float().log_softmax(-1), out.state, out.attended.alpha, out.attended.location)

    def select(self, state: DecoderState, rows: torch.Tensor) -> DecoderState:
        return DecoderState(state.h[rows], state.c[rows])


class ModelSearch:
    """The PyTorch engine of captioning/search.py for one model (in eval mode: no dropout). ``fast``
    (``model.decoder.fast``): the steps take captioning/fast.py's form of the additive score (the
    same alphas; another score keeps its own, said once); False: the paper's form throughout."""

    def __init__(self, model: ShowAttendTell, *, fast: bool = True) -> None:
        self.model = model
        self.fast_step = fast_path.decoding_step(model.decoder) if fast else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, options: DecodeOptions,
                 image_mask: torch.Tensor | None = None) -> list[list[Hypothesis]]:
        """images [B, 3, H, W] (or annotation grids [B, L, D]) -> per image, up to ``options.n_best``
        captions, best first (captioning.search.search)."""
        features, mask = self.model.encode(images, image_mask)
        return self.annotations(features, mask, options)

    @torch.no_grad()
    def annotations(self, features: torch.Tensor, mask: torch.Tensor, options: DecodeOptions) -> list[list[Hypothesis]]:
        """The same from the encoder's annotations: features [B, L, D], mask [B, L] bool."""
        return search(self.step(features, mask, options.hard_mode or "expected"), features.shape[0], options)

    def step(self, features: torch.Tensor, mask: torch.Tensor, mode: str = "expected") -> ModelStep:
        """The search's step over these annotations, attending in ``mode``."""
        return ModelStep(self.model, features, mask, mode, self.fast_step)


def best_captions(pools: Sequence[Sequence[Hypothesis]]) -> Decoded:
    """The first (best) hypothesis of each pool of a PyTorch search, as padded tensors."""
    best = [pool[0] for pool in pools]
    alphas0 = best[0].alphas
    device, L = alphas0.device, alphas0.shape[-1]
    lengths = torch.tensor([len(h.tokens) for h in best], dtype=torch.long, device=device)
    T = int(lengths.max())
    tokens = torch.full((len(best), T), Vocabulary.pad_id, dtype=torch.long, device=device)
    alphas = torch.zeros(len(best), T, L, dtype=alphas0.dtype, device=device)
    for b, h in enumerate(best):
        n = len(h.tokens)
        tokens[b, :n] = torch.tensor(h.tokens, dtype=torch.long)
        alphas[b, :n] = h.alphas.to(alphas.dtype)
    scores = torch.tensor([h.score for h in best], dtype=torch.float32, device=device)
    ended = torch.tensor([h.ended for h in best], dtype=torch.bool, device=device)
    return Decoded(tokens, lengths, alphas, scores, ended)
