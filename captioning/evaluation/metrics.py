"""Official COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) via ``pycocoevalcap`` 1.2.

The scorers are used as ``pycocoevalcap.eval.COCOEvalCap`` uses them: every caption is tokenised
with the Stanford ``PTBTokenizer`` (Java; lower-cased, the tokens of ``PTB_PUNCTUATIONS`` removed),
then ``compute_score(gts, res)`` with ``gts = {image_id: [ref, ...]}`` and ``res = {image_id:
[hypothesis]}``. :func:`score_captions` returns corpus scores on the scorers' native 0-1 scale
(CIDEr-D natively 0-10); :func:`score_details` also the tokenizer, per-image scores and every
skipped metric with its reason; :func:`format_metrics_table` prints them x100. Each score is one
:class:`Scorer` of :data:`SCORERS`; :func:`register_scorer` adds one.

Cost: BLEU-only calls never start METEOR's JVM; the ``"ptb"`` tokenizer starts one short JVM and
memoises each tokenised string (PTB tokenises line by line), so repeated validation calls only
tokenise new hypotheses; ``"simple"`` needs no Java. METEOR costs a JVM start and ~7 s of
paraphrase loading per call; its process always ends before the call returns.

Caveats:
* CIDEr-D's IDF weights come from the references passed in: compare CIDEr only on the same image
  set (with one image every n-gram has IDF 0 and CIDEr is 0).
* BLEU-n is close to 0 for a hypothesis shorter than n tokens, however right it is.
* Whitespace inside captions is collapsed to single spaces first: the PTB wrapper joins captions
  with ``\\n`` and splits its output on ``\\n``, so a ``\\r`` or U+2028 would misalign every later caption.
* Empty captions are scored as they are (0 for that image), no placeholder token; ``"|||"``
  (METEOR's field separator) is removed from what METEOR gets.
* A METEOR process that stops answering is killed after ``meteor_timeout`` seconds and the metric
  reported skipped.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import importlib
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

from captioning.console import InvalidType, InvalidValue, OperationFailed, one_line

__all__ = ["METRIC_KEYS", "METRIC_GROUPS", "SCORERS", "Scorer", "register_scorer", "ScoreReport", "java_available",
           "simple_tokenize", "score_captions", "score_details", "format_metrics_table"]

logger = logging.getLogger(__name__)

_TOKENIZERS = ("auto", "ptb", "simple")

# Display names of the other values format_metrics_table shows (scorers name their own keys).
_DISPLAY_NAMES = {
    "caption_accuracy": "caption accuracy",
    "pointing_game": "pointing game (mean over words)",
    "mass_in_box": "mass in box (mean over words)",
    "pointing_game_per_image": "pointing game (mean over images)",
    "mass_in_box_per_image": "mass in box (mean over images)",
    "grounding_words": "grounding words (count)",
    # Grounding by word kind (captioning/evaluation/grounding.py, "Word kinds"), each with the
    # score of a uniform map on the same words.
    "uniform_pointing_game": "pointing game, uniform map",
    "uniform_mass_in_box": "mass in box, uniform map",
    **{f"{prefix}{name}_{kind}": f"{title}{', uniform map' if prefix else ''} ({kind_title})"
       for kind, kind_title in (("attribute", "attribute words"), ("phrase", "whole phrase"))
       for prefix in ("", "uniform_")
       for name, title in (("pointing_game", "pointing game"), ("mass_in_box", "mass in box"))},
    "grounding_words_attribute": "attribute words (count)",
    "grounding_words_phrase": "object phrases (count)",
}

#: Values that are counts, not scores: shown and reported as they are, never x100.
COUNT_KEYS = frozenset({"grounding_words", "grounding_words_attribute", "grounding_words_phrase"})

# The punctuation tokens pycocoevalcap 1.2's PTBTokenizer removes (its ``PUNCTUATIONS``), copied so
# that the simple tokenizer does not depend on the package's layout.
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])

#: Default upper bound (seconds) for one METEOR run: ``base + per_image * num_images``.
METEOR_TIMEOUT_BASE_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.05


@dataclass(frozen=True)
class ScoreReport:
    """Result of :func:`score_details`."""

    scores: dict[str, float]  # corpus scores, 0-1 (CIDEr-D 0-10), SCORERS order; only those computed
    tokenizer: str  # "ptb" (official Stanford PTBTokenizer) or "simple" (simple_tokenize)
    num_images: int
    image_ids: tuple[Hashable, ...] = ()  # the order of per_image
    # score key -> per-image scores (BLEU-n: pycocoevalcap's sentence BLEU; SPICE: the "All" F-score)
    per_image: dict[str, tuple[float, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # score key -> why it was not computed
    seconds: float = 0.0  # wall time of the call

    def notes(self) -> list[str]:
        """Human-readable notes (tokenizer used, skipped metrics) for logs and reports."""
        lines = [f"tokenizer: {self.tokenizer}" + (
            " (official Stanford PTBTokenizer)" if self.tokenizer == "ptb"
            else " (pure-Python approximation of PTBTokenizer; not the official protocol)"
        ), f"images scored: {self.num_images}"]
        lines += [f"{key} skipped: {reason}" for key, reason in self.skipped.items()]
        return lines


# --------------------------------------------------------------------------------------- Java


@functools.lru_cache(maxsize=1)
def java_version() -> str | None:
    """The first line ``java -version`` prints, or None without a working ``java`` on PATH (cached:
    ``java_version.cache_clear()`` re-checks)."""
    if shutil.which("java") is None:
        return None
    try:
        proc = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return (lines[0] if lines else "java") if proc.returncode == 0 else None


def java_available() -> bool:
    """True if a working ``java`` is on PATH."""
    return java_version() is not None


# ---------------------------------------------------------------------------------- tokenizers

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_EDGE_PUNCT = ".,!?:;\"'`"
_CLITIC_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_COMMA_RE = re.compile(r"(?<!\d),|,(?!\d)")
_PERCENT_RE = re.compile(r"(\S)%")
_DOLLAR_RE = re.compile(r"\$(\S)")
_INITIALISM_RE = re.compile(r"^(?:[a-z]\.){2,}$")


def simple_tokenize(caption: str) -> str:
    """Pure-Python approximation of pycocoevalcap's PTB tokenisation (no Java needed).

    Lower-cases, peels edge punctuation off each token, splits what PTB splits (``dog's`` -> ``dog
    's``, ``don't`` -> ``do n't``, ``cannot`` -> ``can not``, ``dog,cat``, ``100%``, ``$5``) and
    drops :data:`PTB_PUNCTUATIONS`. Brackets become ``-lrb-``/... as in the official pipeline
    (which lower-cases ``-LRB-`` before filtering, so they survive). Hyphenated words, decimals
    and initialisms (``u.s.``) stay whole. Identical to PTB on ordinary captions; rare constructs
    (``rock 'n' roll``) may differ.
    """
    text = _BRACKET_RE.sub(lambda m: f" {_BRACKETS[m.group(0)]} ", caption.lower())
    text = _COMMA_RE.sub(" ", text)
    text = _PERCENT_RE.sub(r"\1 %", text)
    text = _DOLLAR_RE.sub(r"$ \1", text)
    out: list[str] = []
    for raw in text.split():
        if raw in PTB_PUNCTUATIONS:
            continue
        token = raw.lstrip(_EDGE_PUNCT)
        if _INITIALISM_RE.match(token):
            out.append(token)
            continue
        core = token.rstrip(_EDGE_PUNCT)
        if not core:
            continue
        if core == "cannot":
            out.extend(("can", "not"))
            continue
        match = _CLITIC_RE.match(core)
        pieces = [match.group(1), match.group(2)] if match else [core]
        out.extend(p for p in pieces if p and p not in PTB_PUNCTUATIONS)
    return " ".join(out)


# Memo of PTB tokenisations (caption -> tokenised string), cleared when full.
_PTB_CACHE: dict[str, str] = {}
_PTB_CACHE_MAX = 500_000
_PTB_LOCK = threading.Lock()


def _java_ptb_tokenize(lines: list[str]) -> list[str]:
    """pycocoevalcap 1.2's ``PTBTokenizer.tokenize`` of ``lines``: the same Java command and
    punctuation filter, but the input file in a temporary folder, not the installed package, and
    Java's standard error (a "tokenized N tokens" line every call) kept for a failure's message."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "captions.txt")
        with open(path, "wb") as f:
            f.write("\n".join(lines).encode())
        proc = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode:
        last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise OperationFailed(f"the Java PTBTokenizer failed (exit status {proc.returncode}): {last[0]}")
    out = proc.stdout.decode().split("\n")[: len(lines)]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS) for line in out]


def _ptb_tokenize_strings(strings: Sequence[str]) -> list[str]:
    """PTB-tokenise whitespace-normalised strings, memoised per string."""
    with _PTB_LOCK:
        todo = list(dict.fromkeys(s for s in strings if s not in _PTB_CACHE))
        tokenized = _java_ptb_tokenize(todo) if todo else []  # PTB tokenises line by line, in order
        if len(tokenized) != len(todo):  # pragma: no cover - defensive
            raise OperationFailed(f"PTBTokenizer returned {len(tokenized)} lines for {len(todo)} captions")
        new = dict(zip(todo, tokenized))
        out = [new[s] if s in new else _PTB_CACHE[s] for s in strings]
        if len(_PTB_CACHE) + len(new) > _PTB_CACHE_MAX:
            _PTB_CACHE.clear()
        _PTB_CACHE.update(new)
        return out


_WARNED_SIMPLE_FALLBACK = False  # the no-Java fallback warning is logged once per process


def _resolve_tokenizer(tokenizer: str) -> str:
    if tokenizer not in _TOKENIZERS:
        raise InvalidValue(f"tokenizer must be one of {_TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "auto":
        if java_available():
            return "ptb"
        global _WARNED_SIMPLE_FALLBACK
        log = logger.debug if _WARNED_SIMPLE_FALLBACK else logger.warning
        _WARNED_SIMPLE_FALLBACK = True
        log("java not found: using the pure-Python 'simple' tokenizer instead of the official PTBTokenizer "
            "(scores are close to, but not exactly, the official COCO protocol); METEOR and SPICE cannot run")
        return "simple"
    if tokenizer == "ptb" and not java_available():
        raise OperationFailed("tokenizer='ptb' needs Java (Stanford PTBTokenizer) but no working 'java' is on PATH; "
                              "install a JRE or pass tokenizer='simple' / 'auto'")
    return tokenizer


# -------------------------------------------------------------------------------- validation


def _example_ids(ids: set, limit: int = 5) -> str:
    try:
        shown = sorted(ids)[:limit]
    except TypeError:
        shown = sorted(ids, key=repr)[:limit]
    return ", ".join(repr(i) for i in shown) + (", ..." if len(ids) > limit else "")


def _validate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list[Hashable]:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise InvalidType("predictions and references must be mappings keyed by image id")
    if len(predictions) == 0:
        raise InvalidValue("predictions is empty: nothing to score")
    pred_ids, ref_ids = set(predictions), set(references)
    if pred_ids != ref_ids:
        missing, extra = ref_ids - pred_ids, pred_ids - ref_ids
        parts = []
        if missing:
            parts.append(f"{len(missing)} image id(s) have references but no prediction (e.g. {_example_ids(missing)})")
        if extra:
            parts.append(f"{len(extra)} predicted image id(s) have no references (e.g. {_example_ids(extra)})")
        raise InvalidValue("predictions and references must cover exactly the same image ids: " + "; ".join(parts))
    ids = list(predictions)
    for image_id in ids:
        hyp, refs = predictions[image_id], references[image_id]
        if not isinstance(hyp, str):
            raise InvalidValue(f"prediction for image {image_id!r} must be one caption string, got "
                               f"{type(hyp).__name__}")
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise InvalidValue(f"references for image {image_id!r} must be a sequence of caption strings, "
                               f"got {type(refs).__name__}")
        if len(refs) == 0:
            raise InvalidValue(f"image {image_id!r} has no reference captions")
        for ref in refs:
            if not isinstance(ref, str):
                raise InvalidValue(f"reference captions for image {image_id!r} must be strings, got "
                                   f"{type(ref).__name__}")
    return ids


def _resolve_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = {alias: s.name for s in SCORERS.values() for alias in (s.name, *s.aliases)}
    groups: list[str] = []
    for name in metrics:
        key = names.get(str(name).lower())
        if key is None:
            raise InvalidValue(f"unknown metric {name!r}; choose from {sorted(SCORERS)}")
        if key not in groups:
            groups.append(key)
    if not groups:
        raise InvalidValue("metrics is empty: ask for at least one of " + ", ".join(SCORERS))
    return groups


# --------------------------------------------------------------------------------- scorers


class Scorer(abc.ABC):
    """One score of the table :data:`SCORERS`. A new score is one subclass, setting the attributes
    below and implementing :meth:`compute`, decorated with :func:`register_scorer`."""

    name: str  #: the name ``metrics=`` accepts (lower case)
    keys: tuple[str, ...]  #: the score keys it produces, in reporting order
    labels: tuple[str, ...]  #: the display names of ``keys`` (:func:`format_metrics_table`)
    aliases: tuple[str, ...] = ()  #: other (lower-case) names ``metrics=`` accepts
    java: str = ""  #: what of it runs on Java (e.g. "METEOR 1.5 jar"); without Java it is skipped
    fallible: bool = False  #: a failure skips the score, with the reason, instead of raising
    warn_unavailable: bool = False  #: log a warning when it cannot run here, not only when it fails

    @property
    def title(self) -> str:  # the score's name in skip reasons and log lines
        return self.labels[0] if len(self.labels) == 1 else self.name

    def unavailable(self) -> str:
        """Why the score cannot run here ("" when it can)."""
        if self.java and not java_available():
            return f"needs Java ({self.java}) and no working 'java' is on PATH"
        return ""

    @abc.abstractmethod
    def compute(self, gts: dict, res: dict, **options) -> tuple[Sequence[float], Sequence[Sequence[float]]]:
        """Corpus scores, and per-image scores in ``gts`` order, each aligned with :attr:`keys`.

        ``gts = {image_id: [tokenised reference, ...]}`` and ``res = {image_id: [tokenised
        hypothesis]}`` (same ids, same order); ``options`` are :func:`score_details`' keyword
        arguments (``meteor_timeout``).
        """


#: The scorers by name, in reporting order: the metrics ``metrics=`` accepts.
SCORERS: dict[str, Scorer] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: add an instance of ``cls`` to :data:`SCORERS`, after those already there."""
    if cls.name in SCORERS:
        raise InvalidValue(f"a scorer named {cls.name!r} is already registered")
    SCORERS[cls.name] = cls()
    return cls


def _close_meteor(meteor) -> None:
    """Kill a pycocoevalcap Meteor's JVM and close its pipes (idempotent).

    pycocoevalcap 1.2's ``Meteor`` has no ``close()``, and its ``__del__`` takes ``self.lock``
    first, which deadlocks the garbage collector when ``compute_score`` raised holding it: the lock
    (a plain ``threading.Lock``, releasable from any thread) is released first.
    """
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():
        with contextlib.suppress(RuntimeError):  # released concurrently
            lock.release()
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _run_meteor(gts: dict, res: dict, timeout: float) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    def clean(text: str) -> str:
        return " ".join(text.replace("|||", " ").split())

    gts = {k: [clean(r) for r in v] for k, v in gts.items()}
    res = {k: [clean(h) for h in v] for k, v in res.items()}
    meteor = Meteor()
    timed_out = threading.Event()

    def _kill() -> None:
        timed_out.set()
        with contextlib.suppress(OSError):
            meteor.meteor_p.kill()

    watchdog = threading.Timer(timeout, _kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        score, scores = meteor.compute_score(gts, res)
    except Exception as exc:
        if timed_out.is_set():
            raise TimeoutError(f"METEOR did not answer within {timeout:g} s (process killed)") from exc
        stderr = ""
        with contextlib.suppress(Exception):  # best-effort diagnostics
            meteor.meteor_p.kill()
            stderr = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-300:]
        detail = f"; java: {stderr}" if stderr else ""
        raise RuntimeError(f"{type(exc).__name__}: {exc}{detail}") from exc  # the skip reason names its type
    finally:
        watchdog.cancel()
        _close_meteor(meteor)
    return float(score), [float(s) for s in scores]


def _spice_models_missing() -> str:
    """Why SPICE cannot run offline: the CoreNLP jars it needs are absent; "" when both are there."""
    import pycocoevalcap.spice.get_stanford_models as gsm

    lib = os.path.join(os.path.dirname(os.path.abspath(gsm.__file__)), gsm.SPICELIB)
    needed = [os.path.join(lib, f"{gsm.JAR}.jar"), os.path.join(lib, f"{gsm.JAR}-models.jar")]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        return (f"Stanford CoreNLP models not present ({', '.join(os.path.basename(p) for p in missing)} "
                f"missing in {lib}); pycocoevalcap would download them on first use. Fetch them once with "
                "network access: python -m pycocoevalcap.spice.get_stanford_models")
    return ""


def _run_spice(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    score, scores = Spice().compute_score(gts, res)
    # Spice iterates sorted(image ids); re-align per-image "All" F-scores to our order.
    order = sorted(gts)
    per_id = {image_id: float(s["All"]["f"]) for image_id, s in zip(order, scores)}
    return float(score), [per_id[k] for k in gts]


@register_scorer
class BleuScorer(Scorer):
    name, keys = "bleu", ("bleu_1", "bleu_2", "bleu_3", "bleu_4")
    labels = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
    aliases = (*(f"bleu_{n}" for n in range(1, 5)), *(f"bleu-{n}" for n in range(1, 5)))

    def compute(self, gts, res, **options):
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4).compute_score(gts, res, verbose=0)


@register_scorer
class MeteorScorer(Scorer):
    name, keys, labels = "meteor", ("meteor",), ("METEOR",)
    java, fallible = "METEOR 1.5 jar", True  # never let METEOR take the evaluation down

    def compute(self, gts, res, meteor_timeout=None, **options):
        if meteor_timeout is None:
            meteor_timeout = METEOR_TIMEOUT_BASE_S + METEOR_TIMEOUT_PER_IMAGE_S * len(gts)
        value, each = _run_meteor(gts, res, meteor_timeout)
        return [value], [each]


class OneValueScorer(Scorer):
    """A pycocoevalcap scorer of one value, ``module``'s ``cls``, imported when first used."""

    module: str
    cls: str

    def compute(self, gts, res, **options):
        value, each = getattr(importlib.import_module(self.module), self.cls)().compute_score(gts, res)
        return [value], [each]


@register_scorer
class RougeScorer(OneValueScorer):
    name, keys, labels, aliases = "rouge", ("rouge_l",), ("ROUGE-L",), ("rouge_l", "rouge-l")
    module, cls = "pycocoevalcap.rouge.rouge", "Rouge"


@register_scorer
class CiderScorer(OneValueScorer):
    name, keys, labels, aliases = "cider", ("cider",), ("CIDEr",), ("cider-d", "cider_d")
    module, cls = "pycocoevalcap.cider.cider", "Cider"


@register_scorer
class SpiceScorer(Scorer):
    name, keys, labels = "spice", ("spice",), ("SPICE",)
    java, fallible, warn_unavailable = "SPICE 1.0 jar", True, True

    def unavailable(self) -> str:
        return super().unavailable() or _spice_models_missing()

    def compute(self, gts, res, **options):
        value, each = _run_spice(gts, res)
        if not math.isfinite(value):
            raise RuntimeError("SPICE returned a non-finite score")  # the skip reason names its type
        return [value], [each]


#: The built-in score keys, in reporting order (a registered scorer's keys follow).
METRIC_KEYS = tuple(key for scorer in SCORERS.values() for key in scorer.keys)

#: The built-in metric names ``metrics=`` accepts and the score keys each produces.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {scorer.name: scorer.keys for scorer in SCORERS.values()}
#: What evaluate and the test split at the end of training score unless told otherwise: every
#: built-in score but SPICE, which downloads its models when it first runs.
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")


# ------------------------------------------------------------------------------------ public


def score_details(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
    *,
    meteor_timeout: float | None = None,
) -> ScoreReport:
    """Score ``predictions`` (``image_id -> one caption``, may be "") against ``references``
    (``image_id -> non-empty sequence of captions``, the same ids) and report how it was done.

    ``metrics``: names of :data:`SCORERS` (``"bleu"``, ``"meteor"``, ``"rouge"``, ``"cider"``,
    ``"spice"``, a registered one) or their aliases (``"rouge_l"``, ``"bleu_4"``). ``tokenizer``:
    ``"ptb"`` (official, needs Java), ``"simple"`` (:func:`simple_tokenize`) or ``"auto"`` (ptb
    where Java works, else simple with a warning logged once per process). ``meteor_timeout``:
    seconds before a hung METEOR is killed and skipped (default ``120 + 0.05 * num_images``).

    Returns a :class:`ScoreReport`: corpus scores of the computed metrics on the 0-1 scale (CIDEr-D
    natively 0-10), each metric that could not run (no Java, no SPICE models, a failing or hung
    JVM) in ``skipped`` with its reason. Raises ValueError for empty predictions, differing ids
    (counts and example ids named), non-string captions, an image without references, an unknown
    metric or tokenizer; RuntimeError for ``tokenizer="ptb"`` without Java.
    """
    start = time.perf_counter()
    groups = _resolve_metrics(metrics)
    ids = _validate(predictions, references)
    tok = _resolve_tokenizer(tokenizer)

    # Whitespace collapsed, then tokenised in one call: hypotheses first, then every reference.
    hyps = [one_line(predictions[i]) for i in ids]
    refs = [[one_line(r) for r in references[i]] for i in ids]
    flat = hyps + [r for rs in refs for r in rs]
    tokens = iter(_ptb_tokenize_strings(flat) if tok == "ptb" else [simple_tokenize(s) for s in flat])
    res = {image_id: [next(tokens)] for image_id in ids}
    gts = {image_id: [next(tokens) for _ in rs] for image_id, rs in zip(ids, refs)}

    scores: dict[str, float] = {}
    per_image: dict[str, tuple[float, ...]] = {}
    skipped: dict[str, str] = {}

    for scorer in SCORERS.values():  # reporting order
        if scorer.name not in groups:
            continue
        why, failed = scorer.unavailable(), False
        if not why:
            try:
                corpus, each = scorer.compute(gts, res, meteor_timeout=meteor_timeout)
            except Exception as exc:
                if not scorer.fallible:
                    raise
                why, failed = f"{scorer.title} failed: {type(exc).__name__}: {exc}", True
            else:
                for key, value, values in zip(scorer.keys, corpus, each, strict=True):
                    scores[key], per_image[key] = float(value), tuple(float(x) for x in values)
                continue
        skipped.update(dict.fromkeys(scorer.keys, why))
        if failed or scorer.warn_unavailable:
            logger.warning("%s skipped: %s", scorer.title, why)

    return ScoreReport(scores=scores, tokenizer=tok, num_images=len(ids), image_ids=tuple(ids), per_image=per_image,
                       skipped=skipped, seconds=time.perf_counter() - start)


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "auto",
    *,
    meteor_timeout: float | None = None,
) -> dict[str, float]:
    """``score_details(...).scores``: ``{key: score}`` on the 0-1 scale in :data:`SCORERS` order; a
    skipped metric is absent (:func:`score_details` says why)."""
    return score_details(predictions, references, metrics, tokenizer, meteor_timeout=meteor_timeout).scores


def format_metrics_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """Scores as a plain-text table, x100 (the scale papers report): scorers' keys by their labels
    in :data:`SCORERS` order, then the other keys in their order; None and non-finite values
    ``n/a``, counts (:data:`COUNT_KEYS`) as they are. For example::

        Test split
        COCO caption metrics, scores x100 (0-100 scale)
        Metric     x100
        -------  ------
        BLEU-1    80.71
        BLEU-4    69.51
        METEOR    31.79
        ROUGE-L   56.90
        CIDEr    192.00
        (CIDEr-D is natively 0-10, so x100 it can exceed 100)

    Raises ValueError for a value that is not a number.
    """
    labels = {key: label for scorer in SCORERS.values() for key, label in zip(scorer.keys, scorer.labels)}
    keys = [k for k in labels if k in metrics] + [k for k in metrics if k not in labels]
    rows: list[tuple[str, str]] = []
    for key in keys:
        value = metrics[key]
        try:
            number = float("nan") if value is None else float(value)
        except (TypeError, ValueError):
            raise InvalidValue(f"metric {key!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            shown = "n/a"  # e.g. grounding when no generated word names an object
        else:
            shown = str(int(number)) if key in COUNT_KEYS else f"{number * 100:.2f}"
        rows.append((labels.get(key, _DISPLAY_NAMES.get(key, str(key))), shown))
    name_w = max([len("Metric")] + [len(n) for n, _ in rows])
    val_w = max([len("x100")] + [len(v) for _, v in rows])
    lines = [str(title)] if title else []
    lines += ["COCO caption metrics, scores x100 (0-100 scale)", f"{'Metric':<{name_w}}  {'x100':>{val_w}}",
              f"{'-' * name_w}  {'-' * val_w}"]
    if not rows:
        lines.append("(no metrics)")
    lines += [f"{n:<{name_w}}  {v:>{val_w}}" for n, v in rows]
    if "cider" in metrics:
        lines.append("(CIDEr-D is natively 0-10, so x100 it can exceed 100)")
    return "\n".join(lines)
