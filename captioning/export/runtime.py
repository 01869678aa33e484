"""Captioning with the exported ONNX graphs: onnxruntime and NumPy, never torch.

    from captioning.export.runtime import OnnxCaptioner

    captioner = OnnxCaptioner("exported/soft")          # written by `captioning export --format onnx`
    for cap in captioner.caption(["cat.jpg"], beam_size=3):
        print(cap.source, cap.text, cap.score)           # cap.attention: [len(cap.words), grid, grid]

Images go through the same loading and resizing as PyTorch's path (captioning/data/transforms.py,
which needs only Pillow for those), then the same normalisation, in NumPy. The loops are those of
captioning/decoding.py, step for step: greedy decoding and beam search over the exported step
(see captioning/export/onnx.py), the same ranking key, the same end-of-search test, and the same
restricted vocabulary (:func:`captioning.vocab.banned_ids`). A test holds their captions equal to
PyTorch's token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from captioning.config import to_dict
from captioning.data.transforms import MEAN, STD, load_image, resize_square, to_rgb
from captioning.model_folder import CheckpointError, read_folder_meta, read_onnx_meta
from captioning.vocab import Vocabulary, banned_ids

NEG_INF = np.float32(-np.inf)


class OnnxModelError(ValueError):
    """The folder holds no exported graphs, or graphs this engine cannot run."""


@dataclass
class OnnxCaption:
    text: str
    words: list[str]
    score: float  # sum of log p(word) over the words and <end>
    attention: np.ndarray  # [len(words), gh, gw] float32
    source: str
    ended: bool = True
    alternatives: list["OnnxCaption"] = field(default_factory=list)


@dataclass
class _Hyp:
    key: float
    score: float
    tokens: list[int]
    alphas: np.ndarray  # [n, L]
    ended: bool


def log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


class OnnxCaptioner:
    """The exported encoder and decoder step of a model folder, with NumPy decoding loops."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError("the ONNX engine needs onnxruntime: pip install 'show-attend-tell[export]'") from None
        folder = Path(folder)
        meta_path = folder / "onnx.json"
        if not meta_path.is_file():
            raise OnnxModelError(f"{folder} holds no ONNX graphs (no onnx.json); write them with "
                                 "'captioning export --checkpoint CKPT --out DIR --format onnx'")
        # The folder is checked as the PyTorch loader checks it (vocabulary fingerprint, config
        # ranges), and onnx.json against config.json, before any graph is loaded.
        try:
            _, cfg, self.vocab = read_folder_meta(folder)
            meta = read_onnx_meta(folder, cfg)
        except CheckpointError as err:
            raise OnnxModelError(err) from None
        self.meta = meta
        self.image_size = meta["image_size"]
        self.grid_size = cfg.model.encoder.grid_size
        self.decode_defaults = to_dict(cfg.decode)
        self.attention = meta["attention"]
        self.hard_mode = meta.get("hard_mode")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.encoder = ort.InferenceSession(str(folder / meta["encoder"]), options, providers=["CPUExecutionProvider"])
            self.step = ort.InferenceSession(str(folder / meta["step"]), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for missing or damaged files
            raise OnnxModelError(f"cannot load the ONNX graphs of {folder}: {' '.join(str(err).split())[:300]}") from None

    # ------------------------------------------------------------------------------ images

    def preprocess(self, image) -> np.ndarray:
        """A path or PIL image -> [3, S, S] float32, as captioning.data.transforms.preprocess gives."""
        img = self.open(image)
        x = np.asarray(resize_square(img, self.image_size), dtype=np.float32) / np.float32(255)
        x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    # ------------------------------------------------------------------------------ decoding

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """images [B, 3, S, S] -> features [B, L, D], keys [B, L, K], h_0, c_0 [B, n]."""
        return tuple(self.encoder.run(None, {"images": images.astype(np.float32, copy=False)}))

    def run_step(self, words, h, c, features, keys):
        return self.step.run(None, {"words": words.astype(np.int64, copy=False), "h": h, "c": c,
                                    "features": features, "keys": keys})

    def greedy(self, images: np.ndarray, max_len: int = 30, min_len: int = 0,
               no_unk: bool = False) -> list[_Hyp]:
        """Greedy decoding, as captioning.decoding.greedy_decode_features."""
        features, keys, h, c = self.encode(images)
        B, L = features.shape[0], features.shape[1]
        words = np.full(B, Vocabulary.start_id, dtype=np.int64)
        finished = np.zeros(B, dtype=bool)
        natural_end = np.zeros(B, dtype=bool)
        scores = np.zeros(B, dtype=np.float32)
        tokens: list[list[int]] = [[] for _ in range(B)]
        alphas: list[list[np.ndarray]] = [[] for _ in range(B)]
        for t in range(max_len + 1):
            log_p, h, c, alpha = self.run_step(words, h, c, features, keys)
            log_p = log_p.astype(np.float32, copy=True)
            log_p[:, banned_ids(t, min_len, no_unk)] = NEG_INF
            best = np.full(B, Vocabulary.end_id, dtype=np.int64) if t == max_len else log_p.argmax(-1)
            picked = log_p[np.arange(B), best]
            scores = scores + np.where(finished, np.float32(0), picked).astype(np.float32)
            for b in range(B):
                if not finished[b] and best[b] != Vocabulary.end_id:
                    tokens[b].append(int(best[b]))
                    alphas[b].append(alpha[b])
            is_end = best == Vocabulary.end_id
            if t < max_len:
                natural_end |= ~finished & is_end
            finished = finished | is_end
            words = best
            if finished.all():
                break
        return [_Hyp(float(scores[b]), float(scores[b]), tokens[b],
                     np.stack(alphas[b]) if alphas[b] else np.zeros((0, L), np.float32), bool(natural_end[b]))
                for b in range(B)]

    def beam(self, images: np.ndarray, beam_size: int = 3, max_len: int = 30, length_penalty: float = 0.0,
             min_len: int = 0, no_unk: bool = False) -> list[list[_Hyp]]:
        """Beam search, as captioning.decoding._beam_search: per image, its finished hypotheses,
        best first (at most ``beam_size``)."""
        features, keys, h, c = self.encode(images)
        B, L = features.shape[0], features.shape[1]
        K = beam_size
        V = len(self.vocab)
        rows = np.repeat(np.arange(B), K)  # every beam row has its own copy of its image's annotations
        features, keys = features[rows], keys[rows]
        h, c = h[rows], c[rows]
        words = np.full(B * K, Vocabulary.start_id, dtype=np.int64)
        scores = np.full((B, K), NEG_INF, dtype=np.float32)
        scores[:, 0] = 0.0  # only beam 0 is live at first, else the K copies give K duplicates
        tokens = np.zeros((B * K, 0), dtype=np.int64)
        alphas = np.zeros((B * K, 0, L), dtype=np.float32)
        base = np.arange(B)[:, None] * K
        n_cand, n_row = min(2 * K, K * V), min(2 * K, V)
        pools: list[list[_Hyp]] = [[] for _ in range(B)]
        done = [False] * B

        def key_of(score: float, length: int) -> float:
            return score if length_penalty == 0 else score / float(length + 1) ** length_penalty

        def add(b: int, hyp: _Hyp) -> None:
            pools[b].append(hyp)
            pools[b].sort(key=lambda x: -x.key)  # stable, as in PyTorch's loop
            del pools[b][K:]

        for t in range(max_len + 1):
            log_p, h, c, step_alpha = self.run_step(words, h, c, features, keys)
            log_p = log_p.astype(np.float32, copy=True)
            if t == max_len:  # out of room: every live beam is force-ended
                final = scores + log_p[:, Vocabulary.end_id].reshape(B, K)
                for b in range(B):
                    if done[b]:
                        continue
                    for k in range(K):
                        if np.isfinite(final[b, k]):
                            row = b * K + k
                            s = float(final[b, k])
                            add(b, _Hyp(key_of(s, t), s, tokens[row].tolist(), alphas[row].copy(), False))
                break
            log_p[:, banned_ids(t, min_len, no_unk)] = NEG_INF
            row_word = _top(log_p, n_row)  # (B*K, 2K) each beam's best words, sorted
            row_log_p = np.take_along_axis(log_p, row_word, 1)
            cand = (scores[:, :, None] + row_log_p.reshape(B, K, n_row)).reshape(B, K * n_row)
            top_idx = _top(cand, n_cand)  # (B, 2K)
            top_scores = np.take_along_axis(cand, top_idx, 1)
            top_beam = top_idx // n_row
            top_word = np.take_along_axis(row_word.reshape(B, K * n_row), top_idx, 1)
            is_end = top_word == Vocabulary.end_id
            finished = is_end[:, :K] & np.isfinite(top_scores[:, :K])
            for b, j in zip(*np.nonzero(finished)):
                if not done[b]:
                    row = b * K + top_beam[b, j]
                    s = float(top_scores[b, j])
                    add(b, _Hyp(key_of(s, t), s, tokens[row].tolist(), alphas[row].copy(), True))
            order = np.argsort(is_end * n_cand + np.arange(n_cand), axis=1, kind="stable")[:, :K]
            scores = np.take_along_axis(top_scores, order, 1)
            parent = (base + np.take_along_axis(top_beam, order, 1)).reshape(-1)
            words = np.take_along_axis(top_word, order, 1).reshape(-1)
            tokens = np.concatenate([tokens[parent], words[:, None]], 1)
            alphas = np.concatenate([alphas[parent], step_alpha[parent][:, None]], 1)
            h, c = h[parent], c[parent]
            n_best = max_len if length_penalty > 0 else t + 1
            bound = scores[:, 0] / np.float32(float(n_best + 1) ** length_penalty)
            for b in range(B):
                if not done[b] and len(pools[b]) == K and bound[b] <= pools[b][-1].key:
                    done[b] = True
            if all(done):
                break
        for pool in pools:
            if not pool:
                pool.append(_Hyp(float("-inf"), float("-inf"), [], np.zeros((0, L), np.float32), False))
        return pools

    def settings(self, beam_size: int | None = None, max_len: int | None = None, n_best: int = 1,
                 min_len: int = 0, no_unk: bool = False) -> dict:
        """The decoding settings of a call (validated): the exported graphs' hard mode, the
        folder's decoding defaults unless overridden. Raises ValueError naming the problem."""
        for name, value, low in (("beam_size", beam_size, 1), ("max_len", max_len, 1), ("n_best", n_best, 1),
                                 ("min_len", min_len, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if beam_size is None:
            beam_size = max(int(self.decode_defaults["beam_size"]), n_best)
        max_len = int(self.decode_defaults["max_len"] if max_len is None else max_len)
        if n_best > beam_size:
            raise ValueError(f"n_best {n_best} needs a beam at least as wide (beam_size {beam_size})")
        if min_len > max_len:
            raise ValueError(f"min_len {min_len} is above max_len {max_len}; lower min_len or raise max_len")
        return {"engine": "onnx", "method": "greedy" if beam_size == 1 else "beam", "beam_size": beam_size,
                "length_penalty": float(self.decode_defaults.get("length_penalty", 0.0)) if beam_size > 1 else None,
                "max_len": max_len, "hard_mode": self.hard_mode, "attention": self.attention, "n_best": n_best,
                "min_len": min_len, "no_unk": bool(no_unk)}

    def open(self, image):
        """A path or PIL image -> RGB PIL image, by the one loader (captioning/data/transforms.py)."""
        from PIL import Image

        return to_rgb(image) if isinstance(image, Image.Image) else load_image(image)

    def caption_arrays(self, images: np.ndarray, sources: Sequence[str], **options) -> list[OnnxCaption]:
        """Decode preprocessed images [B, 3, S, S] (from :meth:`preprocess`); ``options`` as
        :meth:`settings` takes them."""
        s = self.settings(**options)
        if s["beam_size"] == 1:
            pools = [[hyp] for hyp in self.greedy(images, s["max_len"], s["min_len"], s["no_unk"])]
        else:
            pools = self.beam(images, s["beam_size"], s["max_len"], s["length_penalty"], s["min_len"], s["no_unk"])
        out = []
        for source, pool in zip(sources, pools):
            best, *rest = [self._caption(hyp, source) for hyp in pool[: s["n_best"]]]
            best.alternatives = rest
            out.append(best)
        return out

    def caption(self, images: Sequence, batch_size: int = 32, **options) -> list[OnnxCaption]:
        """Caption image files or PIL images (greedy with beam_size 1, else beam search);
        ``options``: beam_size, max_len, n_best, min_len, no_unk."""
        from PIL import Image

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        self.settings(**options)  # fail before reading any image
        out: list[OnnxCaption] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = np.stack([self.preprocess(image) for image in chunk])
            sources = ["<PIL image>" if isinstance(image, Image.Image) else str(image) for image in chunk]
            out += self.caption_arrays(batch, sources, **options)
        return out

    def _caption(self, hyp: _Hyp, source: str) -> OnnxCaption:
        words = self.vocab.decode(hyp.tokens)
        g = self.grid_size
        attention = hyp.alphas[: len(words)].reshape(len(words), g, g).astype(np.float32)
        return OnnxCaption(" ".join(words), words, hyp.score, attention, source, hyp.ended)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first (ties: lower index first)."""
    part = np.argpartition(-x, k - 1, axis=1)[:, :k] if k < x.shape[1] else np.broadcast_to(np.arange(x.shape[1]), x.shape)
    vals = np.take_along_axis(x, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1)
