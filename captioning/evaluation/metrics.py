"""Official COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) via ``pycocoevalcap``.

This module is a thin, defensive wrapper around the scorers of ``pycocoevalcap`` 1.2, used the same
way the official COCO caption evaluation (``pycocoevalcap.eval.COCOEvalCap``) uses them:

1. every caption (hypotheses and references) is tokenised with the Stanford ``PTBTokenizer``
   (Java; lower-cases and removes the punctuation tokens listed in
   ``pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS``);
2. each scorer is called as ``compute_score(gts, res)`` with ``gts = {image_id: [ref, ...]}`` and
   ``res = {image_id: [hypothesis]}`` (exactly one hypothesis per image).

Entry points
------------
``score_captions(predictions, references, metrics=..., tokenizer=...) -> dict[str, float]``
    Corpus-level scores on the scorers' native **0-1 scale** (CIDEr-D is natively 0-10), keyed by
    the scorers' keys (:data:`METRIC_KEYS` for the built-in ones). Only metrics that were actually
    computed are present.
``score_details(...) -> ScoreReport``
    Same arguments; additionally records the tokenizer used, the number of images, per-image scores
    and every skipped metric with the reason (e.g. METEOR without Java, SPICE without its models).
``format_metrics_table(metrics, title=None) -> str``
    Plain-text table of the scores multiplied by 100 (the scale papers report).

Each score is one :class:`Scorer` in the table :data:`SCORERS` (its keys, display names, whether
it needs Java, how it computes corpus and per-image scores); :func:`register_scorer` adds one.

Cost
----
BLEU-only calls (``metrics=("bleu",)``) never start METEOR's JVM. With the ``"ptb"`` tokenizer
they start one short-lived tokenizer JVM (well under a second); tokenised strings are memoised
in-process (PTB tokenisation of a line does not depend on other lines), so repeated validation
calls on the same references only tokenise new hypotheses. ``tokenizer="simple"`` avoids Java
altogether. METEOR costs a JVM start plus paraphrase-table loading (~7 s) per call; the process is
always terminated before the call returns.

Caveats worth knowing
---------------------
* **CIDEr-D is corpus dependent**: its IDF weights (document frequencies) are computed from the
  references passed in, so the same caption scores differently inside different evaluation sets;
  only compare CIDEr values computed on the same image set. With a single image every n-gram has
  IDF 0 and CIDEr is 0 whatever the caption.
* BLEU-n needs hypotheses with at least n tokens to be non-zero (a perfect 3-word caption has
  BLEU-4 close to 0).
* Whitespace inside captions is collapsed to single spaces before tokenisation: the PTB wrapper
  joins all captions with ``\\n`` and splits its output on ``\\n``, so a ``\\r``, form feed or
  Unicode line separator inside a caption would silently misalign every following caption.
* Empty captions (or captions that tokenise to nothing, e.g. ``"..."``) are scored as they are
  (BLEU/ROUGE-L/CIDEr/METEOR all give them 0 for that image); no placeholder token is substituted.
  ``"|||"`` (METEOR's field separator) is removed from all strings sent to METEOR.
* METEOR runs under a watchdog: a METEOR process that stops answering (its line protocol hangs on
  malformed input) is killed after ``meteor_timeout`` seconds and the metric is reported skipped.
"""

from __future__ import annotations

import abc
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

from captioning.console import InvalidType, InvalidValue, OperationFailed

__all__ = [
    "METRIC_KEYS",
    "METRIC_GROUPS",
    "SCORERS",
    "Scorer",
    "register_scorer",
    "ScoreReport",
    "java_available",
    "simple_tokenize",
    "score_captions",
    "score_details",
    "format_metrics_table",
]

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

# Punctuation tokens PTBTokenizer removes (copied from pycocoevalcap 1.2 so the simple tokenizer
# works even if the Java-side package layout changes; identical to ``ptbtokenizer.PUNCTUATIONS``).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

#: Default upper bound (seconds) for one METEOR run: ``base + per_image * num_images``.
METEOR_TIMEOUT_BASE_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.05


@dataclass(frozen=True)
class ScoreReport:
    """Result of :func:`score_details`.

    Attributes:
        scores: corpus scores on the 0-1 scale (CIDEr-D natively 0-10), keys in
            :data:`SCORERS` order; only metrics that were computed.
        tokenizer: ``"ptb"`` (official Stanford PTBTokenizer) or ``"simple"`` (pure-Python
            approximation, see :func:`simple_tokenize`).
        num_images: number of images scored.
        image_ids: the image ids in the order used for ``per_image``.
        per_image: ``{score key: per-image scores aligned with image_ids}`` (BLEU-n per image is
            pycocoevalcap's sentence-level BLEU; SPICE is the per-image "All" F-score).
        skipped: ``{score key: reason}`` for every requested metric that was not computed.
        seconds: wall time of the call.
    """

    scores: dict[str, float]
    tokenizer: str
    num_images: int
    image_ids: tuple[Hashable, ...] = ()
    per_image: dict[str, tuple[float, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

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
def java_available() -> bool:
    """True if a working ``java`` executable is on PATH (checked once per process, cached).

    Call ``java_available.cache_clear()`` to re-check.
    """
    if shutil.which("java") is None:
        return False
    try:
        proc = subprocess.run(
            ["java", "-version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


# ---------------------------------------------------------------------------------- tokenizers

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_EDGE_PUNCT = ".,!?:;\"'`"
_CLITIC_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_COMMA_RE = re.compile(r"(?<!\d),|,(?!\d)")
_PERCENT_RE = re.compile(r"(\S)%")
_DOLLAR_RE = re.compile(r"\$(\S)")
_INITIALISM_RE = re.compile(r"^(?:[a-z]\.){2,}$")


def _normalise_whitespace(caption: str) -> str:
    """Collapse every kind of whitespace (incl. ``\\r``, form feed, U+2028) to single spaces."""
    return " ".join(caption.split())


def simple_tokenize(caption: str) -> str:
    """Pure-Python approximation of pycocoevalcap's PTB tokenisation (no Java needed).

    Lower-cases, splits on whitespace, peels leading/trailing punctuation (``. , ! ? : ; " ' ```)
    off each token, splits what PTB splits (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``,
    ``cannot`` -> ``can not``, ``dog,cat`` -> ``dog cat``, ``100%`` -> ``100 %``, ``$5`` ->
    ``$ 5``) and drops the tokens the official wrapper removes (:data:`PTB_PUNCTUATIONS`).
    Brackets become ``-lrb-``/``-rrb-``/... tokens exactly as in the official pipeline (which
    lower-cases ``-LRB-`` *before* filtering, so those escapes survive there). Hyphenated words,
    decimals and initialisms (``u.s.``) are kept whole. Identical to PTB on ordinary captions;
    may still differ on rare constructs (e.g. ``rock 'n' roll``).
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


# Memo of PTB tokenisations (sanitised caption -> tokenised string). Bounded; cleared when full.
_PTB_CACHE: dict[str, str] = {}
_PTB_CACHE_MAX = 500_000
_PTB_LOCK = threading.Lock()


def _java_ptb_tokenize(lines: list[str]) -> list[str]:
    """pycocoevalcap 1.2's ``PTBTokenizer.tokenize`` of ``lines`` (one image), run here: the same
    Java command on the same input file, and the same punctuation filter on its output lines. The
    Java tokenizer's standard error (a "PTBTokenizer tokenized N tokens at ..." line every call,
    which says nothing about the run) is collected, not printed; its last line explains a failure.
    The input file goes to a temporary folder, not into the installed package."""
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
    """PTB-tokenise a list of (already whitespace-normalised) strings, memoised per string."""
    with _PTB_LOCK:
        todo = list(dict.fromkeys(s for s in strings if s not in _PTB_CACHE))
        if todo:
            tokenized = _java_ptb_tokenize(todo)  # PTB tokenises line by line, in order
            if len(tokenized) != len(todo):  # pragma: no cover - defensive
                raise OperationFailed(
                    f"PTBTokenizer returned {len(tokenized)} lines for {len(todo)} captions"
                )
            new = dict(zip(todo, tokenized))
            if len(_PTB_CACHE) + len(new) > _PTB_CACHE_MAX:
                _PTB_CACHE.clear()
            _PTB_CACHE.update(new)
        else:
            new = {}
        return [new[s] if s in new else _PTB_CACHE[s] for s in strings]


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
        log(
            "java not found: using the pure-Python 'simple' tokenizer instead of the official "
            "PTBTokenizer (scores are close to, but not exactly, the official COCO protocol); "
            "METEOR and SPICE cannot run"
        )
        return "simple"
    if tokenizer == "ptb" and not java_available():
        raise OperationFailed(
            "tokenizer='ptb' needs Java (Stanford PTBTokenizer) but no working 'java' is on PATH; "
            "install a JRE or pass tokenizer='simple' / 'auto'"
        )
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
    """Terminate a pycocoevalcap Meteor's JVM and release its pipes (idempotent).

    pycocoevalcap 1.2's ``Meteor`` has no ``close()``; its ``__del__`` acquires ``self.lock``
    first, which deadlocks the garbage collector if ``compute_score`` raised while holding the
    lock. We release the lock (a plain ``threading.Lock`` may be released from any thread) so a
    later ``__del__`` is harmless, then kill the process and close its pipes.
    """
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():
        try:
            lock.release()
        except RuntimeError:  # pragma: no cover - released concurrently
            pass
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    try:
        proc.kill()
    except OSError:  # pragma: no cover
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


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
        try:
            meteor.meteor_p.kill()
        except OSError:  # pragma: no cover
            pass

    watchdog = threading.Timer(timeout, _kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        score, scores = meteor.compute_score(gts, res)
    except Exception as exc:
        if timed_out.is_set():
            raise TimeoutError(
                f"METEOR did not answer within {timeout:g} s (process killed)"
            ) from exc
        stderr = ""
        try:
            meteor.meteor_p.kill()
            stderr = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-300:]
        except Exception:  # pragma: no cover - best effort diagnostics
            pass
        detail = f"; java: {stderr}" if stderr else ""
        raise RuntimeError(f"{type(exc).__name__}: {exc}{detail}") from exc  # the skip reason names its type
    finally:
        watchdog.cancel()
        _close_meteor(meteor)
    return float(score), [float(s) for s in scores]


def _spice_models_present() -> tuple[bool, str]:
    import pycocoevalcap.spice.get_stanford_models as gsm

    lib = os.path.join(os.path.dirname(os.path.abspath(gsm.__file__)), gsm.SPICELIB)
    needed = [os.path.join(lib, f"{gsm.JAR}.jar"), os.path.join(lib, f"{gsm.JAR}-models.jar")]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        return False, (
            "Stanford CoreNLP models not present ("
            + ", ".join(os.path.basename(p) for p in missing)
            + f" missing in {lib}); pycocoevalcap would download them on first use. Fetch them "
            "once with network access: python -m pycocoevalcap.spice.get_stanford_models"
        )
    return True, ""


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
        return super().unavailable() or _spice_models_present()[1]

    def compute(self, gts, res, **options):
        value, each = _run_spice(gts, res)
        if not math.isfinite(value):
            raise RuntimeError("SPICE returned a non-finite score")  # the skip reason names its type
        return [value], [each]


#: The built-in score keys, in reporting order (a registered scorer's keys follow).
METRIC_KEYS = tuple(key for scorer in SCORERS.values() for key in scorer.keys)

#: The built-in metric names ``metrics=`` accepts and the score keys each produces.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {scorer.name: scorer.keys for scorer in SCORERS.values()}


# ------------------------------------------------------------------------------------ public


def score_details(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"),
    tokenizer: str = "auto",
    *,
    meteor_timeout: float | None = None,
) -> ScoreReport:
    """Score captions with the official COCO caption metrics and report how it was done.

    Args:
        predictions: ``image_id -> generated caption`` (exactly one string per image; may be "").
        references: ``image_id -> all reference captions`` (non-empty sequence of strings). Must
            have exactly the same ids as ``predictions``.
        metrics: any of ``"bleu"`` (BLEU-1..4), ``"meteor"``, ``"rouge"`` (ROUGE-L), ``"cider"``
            (CIDEr-D), ``"spice"``, or a registered scorer's name (:data:`SCORERS`). Aliases like
            ``"rouge_l"`` / ``"bleu_4"`` are accepted.
        tokenizer: ``"ptb"`` (official Stanford PTBTokenizer, needs Java; RuntimeError without),
            ``"simple"`` (pure Python, :func:`simple_tokenize`), or ``"auto"`` (ptb if Java
            works, otherwise simple, with a warning logged once per process).
        meteor_timeout: seconds before a hung METEOR process is killed (metric then skipped).
            Default ``120 + 0.05 * num_images``.

    Returns:
        :class:`ScoreReport`. ``report.scores`` holds corpus scores on the 0-1 scale (CIDEr-D is
        natively 0-10: 1.0 = "100" in papers) for the computed metrics only; metrics that could
        not be computed are in ``report.skipped`` with the reason (METEOR/SPICE without Java,
        SPICE without its Stanford models or when its JVM fails, METEOR timeout/crash).

    Raises:
        ValueError: empty predictions, id mismatch (message names counts and example ids),
            non-string captions, images without references, unknown metric or tokenizer names.
        RuntimeError: ``tokenizer="ptb"`` without Java.

    Note:
        CIDEr-D's IDF statistics come from the references passed in, so CIDEr depends on the
        evaluated image set (and is 0 for a single image).
    """
    start = time.perf_counter()
    groups = _resolve_metrics(metrics)
    ids = _validate(predictions, references)
    tok = _resolve_tokenizer(tokenizer)

    # Sanitise and tokenise, keeping the per-image structure.
    hyps = [_normalise_whitespace(predictions[i]) for i in ids]
    refs = [[_normalise_whitespace(r) for r in references[i]] for i in ids]
    flat = hyps + [r for rs in refs for r in rs]
    if tok == "ptb":
        flat_tok = _ptb_tokenize_strings(flat)
    else:
        flat_tok = [simple_tokenize(s) for s in flat]
    res = {image_id: [flat_tok[n]] for n, image_id in enumerate(ids)}
    gts: dict = {}
    pos = len(ids)
    for image_id, rs in zip(ids, refs):
        gts[image_id] = flat_tok[pos : pos + len(rs)]
        pos += len(rs)

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
    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"),
    tokenizer: str = "auto",
    *,
    meteor_timeout: float | None = None,
) -> dict[str, float]:
    """Corpus scores only: ``score_details(...).scores`` (see :func:`score_details`).

    Returns ``{key: score}`` on the 0-1 scale for the computed metrics, keys in
    :data:`SCORERS` order (e.g. ``bleu_1..bleu_4, meteor, rouge_l, cider``). A metric that
    had to be skipped (METEOR without Java, SPICE without models) is absent; use
    :func:`score_details` to learn why and which tokenizer was used.
    """
    return score_details(predictions, references, metrics, tokenizer, meteor_timeout=meteor_timeout).scores


def format_metrics_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """Render scores as a plain-text table, multiplied by 100 (the scale papers report).

    Scorers' keys use their display names (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE) in
    :data:`SCORERS` order; other keys follow in their given order. None and non-finite values show as ``n/a``;
    counts (:data:`COUNT_KEYS`) as they are. The
    second header line names the scale; for example::

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

    Raises:
        ValueError: a value that is not a number.
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
    lines = []
    if title:
        lines.append(str(title))
    lines.append("COCO caption metrics, scores x100 (0-100 scale)")
    lines.append(f"{'Metric':<{name_w}}  {'x100':>{val_w}}")
    lines.append(f"{'-' * name_w}  {'-' * val_w}")
    if not rows:
        lines.append("(no metrics)")
    lines += [f"{n:<{name_w}}  {v:>{val_w}}" for n, v in rows]
    if "cider" in metrics:
        lines.append("(CIDEr-D is natively 0-10, so x100 it can exceed 100)")
    return "\n".join(lines)
