"""Caption search, written once: greedy decoding, sampling, beam search and n-best lists.

Every engine decodes with these loops and supplies only its :class:`Step` (one step's next-word
log-probabilities, state and attention) and the few :class:`ArrayOps` the loops need: the PyTorch
engine (captioning/decoding.py), the ONNX engine in NumPy (captioning/export/runtime.py). This
file imports neither torch nor NumPy.

How a caption is decoded is one :class:`DecodeOptions`, validated where it is built and recorded
beside every score. Scores are the model's own log-probabilities (a temperature and top-k change
which word is drawn, not its score), so sampled and beam captions rank on one scale. Every loop
bans the same words (:func:`captioning.vocab.banned_ids`): <pad>, <start>, <end> before ``min_len``
words, <unk> with ``no_unk``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

from captioning.console import InvalidValue
from captioning.config import HARD_MODES, DecodeConfig
from captioning.vocab import Vocabulary, banned_ids

Array = Any  # a torch.Tensor or a numpy.ndarray: whatever the engine's ArrayOps make

# ----------------------------------------------------------------------------- options

#: The temperatures a sampling call takes (the demo's too): far below 0.01 the scores divide into
#: infinities, past float32's largest number into NaNs, and no word can be drawn; above 100 every word
#: is about as likely as any other already.
TEMPERATURE_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are decoded, checked as built (a bad combination: ValueError naming the fix).

    ``beam_size`` 1 is greedy; a ``temperature`` or ``top_k`` samples each word (beam size 1), its
    ``n_best`` captions being draws; otherwise ``n_best`` come from a beam at least as wide.
    ``hard_mode``: one of a hard-attention model's test-time modes; None for a model without modes.
    """

    beam_size: int = 1
    max_len: int = 30  # words, <end> excluded
    n_best: int = 1
    min_len: int = 0  # no <end> before this many words
    no_unk: bool = False
    temperature: float | None = None
    top_k: int | None = None
    length_penalty: float = 0.0  # beams rank by score / (length + 1) ** length_penalty
    hard_mode: str | None = None
    method: str = field(init=False)  # "greedy", "beam" or "sample", from the options above

    def __post_init__(self) -> None:
        for name, least in (("max_len", 1), ("beam_size", 1), ("n_best", 1), ("min_len", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidValue(f"{name} must be a {'positive' if least else 'non-negative'} integer, got {value!r}")
        if self.min_len > self.max_len:
            raise InvalidValue(f"min_len {self.min_len} is above max_len {self.max_len}; lower min_len or raise "
                               f"max_len")
        if not isinstance(self.no_unk, bool):
            raise InvalidValue(f"no_unk must be True or False, got {self.no_unk!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InvalidValue(f"top_k must be a positive integer, got {k!r}")
        t, (low, high) = self.temperature, TEMPERATURE_RANGE
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not low <= t <= high):
            raise InvalidValue(f"temperature must be a number from {low:g} to {high:g}, got {t!r} "
                               "(greedy decoding is beam_size 1 without a temperature)")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise InvalidValue(f"length_penalty must be a finite number, got {lp!r}")
        if self.hard_mode is not None and self.hard_mode not in HARD_MODES:
            raise InvalidValue(f"hard_mode must be one of {', '.join(HARD_MODES)}, got {self.hard_mode!r}")
        if self.sampling:
            if self.beam_size > 1:
                raise InvalidValue(f"sampling (temperature/top_k) draws words one by one and cannot use a beam; "
                                   f"drop beam_size {self.beam_size} or the sampling options")
            method = "sample"
        elif self.n_best > self.beam_size:
            raise InvalidValue(f"n_best {self.n_best} needs a beam at least as wide (beam_size {self.beam_size}), "
                               "or sampling (a temperature or top_k) to draw several captions")
        else:
            method = "greedy" if self.beam_size == 1 else "beam"
        object.__setattr__(self, "method", method)

    @property
    def sampling(self) -> bool:
        return self.temperature is not None or self.top_k is not None

    @classmethod
    def for_model(cls, defaults: DecodeConfig, modes: Sequence[str], attention: str, options: "DecodeOptions | None" = None,
                  **overrides) -> "DecodeOptions":
        """``options`` as given (checked against the model's test-time ``modes``, empty if it has
        none; no hard_mode on a model with modes is the model's own, as :meth:`_with_defaults` picks
        it), or the config's ``decode`` ``defaults`` with keyword ``overrides`` (:meth:`_with_defaults`).
        ``attention`` names the mechanism in messages."""
        if options is None:
            return cls._with_defaults(defaults, modes, attention, **overrides)
        if overrides:
            raise InvalidValue(f"give the decoding options as one DecodeOptions or as keywords, not both "
                               f"(got {', '.join(overrides)})")
        if options.hard_mode not in (tuple(modes) or ("expected",)) + (None,):
            raise InvalidValue(f"hard_mode {options.hard_mode!r} is not offered by this model's {attention} attention "
                               f"({'it offers ' + ', '.join(modes) if modes else 'it has no hard mode'})")
        if options.hard_mode is None and modes:  # decoded, and so recorded, with the model's own mode
            return options.replace(hard_mode=cls._model_mode(defaults, modes))
        return options

    @staticmethod
    def _model_mode(defaults: DecodeConfig, modes: Sequence[str]) -> str:
        """The mode a model with test-time ``modes`` attends with when none is asked for."""
        return defaults.hard_mode if defaults.hard_mode in modes else modes[0]

    @classmethod
    def _with_defaults(cls, defaults: DecodeConfig, modes: Sequence[str], attention: str, *,
                       beam_size: int | None = None, max_len: int | None = None, hard_mode: str | None = None,
                       n_best: int = 1, temperature: float | None = None, top_k: int | None = None,
                       min_len: int = 0, no_unk: bool = False) -> "DecodeOptions":
        """A sampling call defaults to beam size 1; otherwise the default beam widens to ``n_best``.
        A model with modes attends with ``defaults.hard_mode`` unless ``hard_mode`` is given; one
        without accepts only "expected" (then recorded as None)."""
        sampling = temperature is not None or top_k is not None
        if beam_size is None:
            beam_size = 1 if sampling else defaults.beam_size
            if isinstance(n_best, int) and not sampling:
                beam_size = max(beam_size, n_best)
        if modes:
            mode = hard_mode or cls._model_mode(defaults, modes)
            if mode not in modes:
                raise InvalidValue(f"hard_mode must be one of {', '.join(modes)} (what this model offers), got "
                                   f"{mode!r}")
        elif hard_mode not in (None, "expected"):
            raise InvalidValue(f"hard_mode {hard_mode!r} needs a hard-attention model; this one uses "
                               f"{attention} attention")
        else:
            mode = None
        return cls(beam_size=beam_size, max_len=defaults.max_len if max_len is None else max_len, n_best=n_best,
                   min_len=min_len, no_unk=no_unk, temperature=temperature, top_k=top_k,
                   length_penalty=defaults.length_penalty, hard_mode=mode)

    def replace(self, **changes) -> "DecodeOptions":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def record(self, attention: str) -> dict:
        """What results files and ``--json`` lines say of how a model of ``attention`` decoded."""
        return {"method": self.method, "beam_size": self.beam_size,
                "length_penalty": self.length_penalty if self.method == "beam" else None, "max_len": self.max_len,
                "hard_mode": self.hard_mode, "attention": attention, "n_best": self.n_best,
                "temperature": self.temperature, "top_k": self.top_k, "min_len": self.min_len, "no_unk": self.no_unk}


# ----------------------------------------------------------------------------- what an engine supplies


class ArrayOps(Protocol):
    """The array operations the loops need beyond operators, indexing, ``reshape`` and ``tolist``
    (which torch tensors and NumPy arrays share). Integers are int64, reals float32."""

    def full(self, shape: tuple[int, ...], value: float, dtype: str) -> Array: ...  # dtype: int64 float32 bool
    def arange(self, n: int) -> Array: ...
    def stack(self, arrays: Sequence[Array], axis: int) -> Array: ...
    def cat(self, arrays: Sequence[Array], axis: int) -> Array: ...
    def where(self, condition: Array, x: Array | float, y: Array | float) -> Array: ...
    def isfinite(self, x: Array) -> Array: ...
    def topk(self, x: Array, k: int) -> tuple[Array, Array]: ...  # last axis, largest first: values, indices
    def gather(self, x: Array, index: Array) -> Array: ...  # along the last axis
    def argsort(self, x: Array) -> Array: ...  # along the last axis; the keys are distinct
    def nonzero(self, x: Array) -> list[tuple[int, ...]]: ...
    def repeat(self, x: Array, k: int) -> Array: ...  # each row k times, in place: [a, a, b, b]
    def sample(self, log_p: Array, temperature: float | None, top_k: int | None) -> Array: ...


class StepResult(NamedTuple):
    log_p: Array  # [R, V] float32 log p(next word); the loops write into it
    state: Any  # the engine's recurrent state of these R rows
    alpha: Array  # [R, L] the step's attention
    location: Array | None  # [R] int64, hard attention's chosen location; None where it took none


class Step(Protocol):
    """One decoder step of an engine, over the rows of a batch of images. Row r of a batch with g
    rows per image belongs to image r // g; ``start`` gives one row per image, ``select`` any rows
    of the current ones (g may change: the engine sees it from the number of rows)."""

    ops: ArrayOps

    def start(self) -> Any: ...  # the initial state, one row per image
    def __call__(self, words: Array, state: Any) -> StepResult: ...  # words [R] int64
    def select(self, state: Any, rows: Array) -> Any: ...


class Hypothesis(NamedTuple):
    """One caption."""

    tokens: list[int]  # word ids, <end> excluded
    alphas: Array  # [len(tokens), L] attention of each word
    score: float  # sum of log p(word) over the words and <end>
    ended: bool  # False if force-ended at max_len
    locations: list[int] | None = None  # hard attention's chosen location per word (greedy or sampling)


# ----------------------------------------------------------------------------- the search


def search(step: Step, images: int, options: DecodeOptions) -> list[list[Hypothesis]]:
    """Per image, up to ``options.n_best`` captions, best first: the beam's best finished hypotheses
    (by its key), the greedy caption, or ``n_best`` draws (by score, repeats dropped)."""
    if options.method == "beam":
        return [pool[:options.n_best] for pool in beam_search(step, images, options)]
    draws = options.n_best if options.method == "sample" else 1
    found = greedy(step, images, options, draws)
    pools = []
    for b in range(images):
        unique: dict[tuple[int, ...], Hypothesis] = {}  # the best-scoring draw of each caption
        for hyp in sorted(found[b * draws:(b + 1) * draws], key=lambda h: -h.score):
            unique.setdefault(tuple(hyp.tokens), hyp)
        pools.append(list(unique.values()))
    return pools


def greedy(step: Step, images: int, options: DecodeOptions, draws: int = 1) -> list[Hypothesis]:
    """Greedy decoding, or each word drawn with ``options.sampling``, over ``draws`` rows per image
    -> one hypothesis per row (image b's rows are b*draws .. b*draws+draws-1)."""
    xp = step.ops
    state = step.start()
    if draws > 1:
        state = step.select(state, xp.repeat(xp.arange(images), draws))
    R, max_len = images * draws, options.max_len
    rows = xp.arange(R)
    words = xp.full((R,), Vocabulary.start_id, "int64")
    finished = xp.full((R,), False, "bool")
    ended = finished
    scores = xp.full((R,), 0.0, "float32")
    tokens, alphas, locations = [], [], []
    for t in range(max_len + 1):  # max_len words, then one more step that may only emit <end>
        out = step(words, state)
        log_p = out.log_p
        log_p[:, banned_ids(t, options.min_len, options.no_unk)] = -math.inf
        if t == max_len:  # out of room: only <end> may follow
            best = xp.full((R,), Vocabulary.end_id, "int64")
        elif options.sampling:
            best = xp.sample(log_p, options.temperature, options.top_k)
        else:
            best = log_p.argmax(-1)  # (R,)
        scores = scores + xp.where(finished, 0.0, log_p[rows, best])
        is_end = best == Vocabulary.end_id
        if t < max_len:
            ended = ended | (~finished & is_end)
        emit = ~finished & ~is_end
        tokens.append(xp.where(emit, best, Vocabulary.pad_id))
        alphas.append(out.alpha * emit[:, None])
        if out.location is not None:
            locations.append(xp.where(emit, out.location, -1))
        finished = finished | is_end
        state, words = out.state, best
        if bool(finished.all()):
            break
    token_t = xp.stack(tokens, 1)  # (R, steps): emitted words, then <pad>
    alpha_t = xp.stack(alphas, 1)
    where = xp.stack(locations, 1).tolist() if locations else None
    lengths = (token_t != Vocabulary.pad_id).sum(1).tolist()
    token_rows, score_rows, ended_rows = token_t.tolist(), scores.tolist(), ended.tolist()
    return [Hypothesis(token_rows[r][:n], alpha_t[r, :n], score_rows[r], ended_rows[r],
                       None if where is None else where[r][:n]) for r, n in enumerate(lengths)]


class _Ranked(NamedTuple):
    key: float  # score / (length + 1) ** length_penalty; the +1 counts <end>; 0 ranks by the plain sum
    hyp: Hypothesis


def beam_search(step: Step, images: int, options: DecodeOptions) -> list[list[Hypothesis]]:
    """Batched beam search -> per image, its finished hypotheses sorted best first (at most K).

    All images advance together: the live beams are rows b*K + k. Each step scores every extension
    (the sum of log-probabilities), keeps the 2K best per image, files the <end> extensions among the
    best K as finished hypotheses and keeps the best K others alive. An image is done once it holds
    K finished hypotheses and no live beam can still beat the worst of them; at step max_len every
    live beam is force-ended (log p(<end>) added, ``ended`` False). Hypotheses rank by
    ``score / (length + 1) ** length_penalty``; scores stay the raw sums.
    """
    xp = step.ops
    B, K, max_len, penalty = images, options.beam_size, options.max_len, options.length_penalty
    state = step.start()
    # The K beams of an image are one until the first word: that step runs once per image, then is
    # copied K times; only beam 0 is live at first, otherwise the K copies would give K duplicates.
    out = step(xp.full((B,), Vocabulary.start_id, "int64"), state)
    out = StepResult(xp.repeat(out.log_p, K), step.select(out.state, xp.repeat(xp.arange(B), K)),
                     xp.repeat(out.alpha, K), None)
    scores = xp.full((B, K), -math.inf, "float32")
    scores[:, 0] = 0.0
    V = out.log_p.shape[1]
    words = xp.full((B * K,), Vocabulary.start_id, "int64")
    tokens = words[:, None][:, :0]  # (B*K, 0) the live beams' words so far
    alphas = out.alpha[:, None][:, :0]  # (B*K, 0, L) and the attention of each
    base = xp.arange(B)[:, None] * K  # (B, 1) the first row of each image
    n_cand, n_row = min(2 * K, K * V), min(2 * K, V)
    pools: list[list[_Ranked]] = [[] for _ in range(B)]
    done = [False] * B

    def add(b: int, score: float, row: int, length: int, ended: bool) -> None:
        pool = pools[b]
        pool.append(_Ranked(score / float(length + 1) ** penalty,
                            Hypothesis(tokens[row].tolist(), alphas[row], score, ended)))
        pool.sort(key=lambda h: -h.key)  # stable: on a tie the earlier hypothesis stays ahead
        del pool[K:]

    for t in range(max_len + 1):  # t words so far; step t emits word t+1 or <end>
        if t:
            out = step(words, state)
        log_p = out.log_p  # (B*K, V)
        if t == max_len:  # out of room: every live beam is force-ended
            final = (scores + log_p[:, Vocabulary.end_id].reshape(B, K)).tolist()
            for b in range(B):
                for k in range(K):
                    if not done[b] and final[b][k] != -math.inf:
                        add(b, final[b][k], b * K + k, t, False)
            break
        log_p[:, banned_ids(t, options.min_len, options.no_unk)] = -math.inf
        # A beam's extensions rank by log p alone, so an image's 2K best are among its beams' own
        # 2K best words: the image-level top-k runs over K x 2K candidates, not K x V.
        row_log_p, row_word = xp.topk(log_p, n_row)  # (B*K, 2K)
        cand = (scores[:, :, None] + row_log_p.reshape(B, K, n_row)).reshape(B, K * n_row)
        top_scores, top_idx = xp.topk(cand, n_cand)  # (B, 2K), best first
        top_beam = top_idx // n_row
        top_word = xp.gather(row_word.reshape(B, K * n_row), top_idx)
        is_end = top_word == Vocabulary.end_id

        finished = is_end[:, :K] & xp.isfinite(top_scores[:, :K])  # <end> among the K best: t words + <end>
        if bool(finished.any()):
            rows = (base + top_beam[:, :K])[finished].tolist()
            ends = top_scores[:, :K][finished].tolist()
            for (b, _), row, s in zip(xp.nonzero(finished), rows, ends):
                if not done[b]:
                    add(b, s, row, t, True)

        # The K best extensions that are not <end> stay live (at most K of the 2K are <end>).
        order = xp.argsort(is_end * n_cand + xp.arange(n_cand))[:, :K]
        scores = xp.gather(top_scores, order)  # (B, K), still sorted
        parent = (base + xp.gather(top_beam, order)).reshape(-1)  # (B*K,) rows of the previous step
        words = xp.gather(top_word, order).reshape(-1)
        tokens = xp.cat([tokens[parent], words[:, None]], 1)
        alphas = xp.cat([alphas[parent], out.alpha[parent][:, None]], 1)
        state = step.select(out.state, parent)

        # Done: K finished, and no live beam can still beat the worst of them. Scores only fall;
        # the length divisor is largest at max_len (penalty > 0) or smallest at t+2 (penalty < 0).
        longest = max_len if penalty > 0 else t + 1
        bound = (scores[:, 0] / float(longest + 1) ** penalty).tolist()
        for b in range(B):
            if not done[b] and len(pools[b]) == K and bound[b] <= pools[b][-1].key:
                done[b] = True
        if all(done):
            break

    empty = Hypothesis([], alphas[0, :0] if B else None, -math.inf, False)
    # An image without a finished hypothesis only if no extension was ever finite.
    return [[r.hyp for r in pool] or [empty] for pool in pools]
