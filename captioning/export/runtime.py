"""Captioning with the exported ONNX graphs: onnxruntime and NumPy, never torch.

    from captioning.export.runtime import OnnxCaptioner

    captioner = OnnxCaptioner("exported/soft")          # written by `captioning export --format onnx`
    for cap in captioner.caption(["cat.jpg"], beam_size=3):
        print(cap.source, cap.text, cap.score)           # cap.attention: [len(cap.words), grid, grid]

Images are loaded and resized as in PyTorch's path (captioning/data/transforms.py, Pillow only),
then normalised the same way in NumPy. The search is captioning/search.py's, the PyTorch engine's
own: this engine supplies only its step (the exported step graph) and NumPy's array operations.
A test holds its captions equal to PyTorch's token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captioning.console import CaptioningError, one_line
from captioning.data.transforms import MEAN, STD, resize_square
from captioning.engine import CaptionEngine
from captioning.model_folder import CheckpointError, check_graph_shapes, read_folder_meta, read_onnx_meta
from captioning.search import DecodeOptions, StepResult


ROLES = ("encoder", "step")  # the graphs of onnx.json


class OnnxModelError(CaptioningError, ValueError):
    """The folder holds no exported graphs, or graphs this engine cannot run."""


class NumpyOps:
    """captioning.search.ArrayOps on NumPy arrays; ``rng`` draws sampled words."""

    DTYPES = {"int64": np.int64, "float32": np.float32, "bool": np.bool_}
    # The library's own functions take the search's arguments as they are.
    stack = staticmethod(np.stack)
    cat = staticmethod(np.concatenate)
    where = staticmethod(np.where)
    isfinite = staticmethod(np.isfinite)

    def __init__(self, rng: np.random.Generator | None = None) -> None:
        self.rng = rng if rng is not None else np.random.default_rng()

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=self.DTYPES[dtype])

    def arange(self, n):
        return np.arange(n, dtype=np.int64)

    def topk(self, x, k):
        index = _top(x, k)
        return np.take_along_axis(x, index, -1), index

    def gather(self, x, index):
        return np.take_along_axis(x, index, -1)

    def argsort(self, x):
        return np.argsort(x, axis=-1, kind="stable")

    def nonzero(self, x):
        return list(zip(*(i.tolist() for i in np.nonzero(x))))

    def repeat(self, x, k):
        return np.repeat(x, k, axis=0)

    def sample(self, log_p, temperature, top_k):
        """One word per row from softmax(log_p / temperature) over its ``top_k`` most likely words."""
        logits = log_p / np.float32(1.0 if temperature is None else temperature)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = np.take_along_axis(logits, _top(logits, top_k)[:, -1:], -1)  # (R, 1) the k-th largest
            logits = np.where(logits < kth, -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        total = p.cumsum(-1)  # (R, V)
        # 1 - U is in (0, 1]: the first word whose cumulative mass reaches it has mass itself.
        u = (1.0 - self.rng.random((p.shape[0], 1))) * total[:, -1:]
        return (total < u).sum(-1).astype(np.int64)


class _OnnxStep:
    """captioning.search.Step over the exported step graph, which wants every row's own copy of
    its image's annotations (made once per rows-per-image)."""

    def __init__(self, engine: "OnnxCaptioner", images: np.ndarray, ops: NumpyOps) -> None:
        self.engine, self.ops = engine, ops
        self.features, self.keys, self.h0, self.c0 = engine.encode(images)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {1: (self.features, self.keys)}

    def start(self):
        return self.h0, self.c0

    def __call__(self, words: np.ndarray, state) -> StepResult:
        h, c = state
        g = h.shape[0] // self.features.shape[0]  # rows per image
        if g not in self._rows:
            self._rows[g] = (np.repeat(self.features, g, axis=0), np.repeat(self.keys, g, axis=0))
        features, keys = self._rows[g]
        log_p, h, c, alpha = self.engine.step.run(None, {"words": words.astype(np.int64, copy=False), "h": h,
                                                          "c": c, "features": features, "keys": keys})
        return StepResult(log_p.astype(np.float32, copy=False), (h, c), alpha, None)

    def select(self, state, rows: np.ndarray):
        h, c = state
        return h[rows], c[rows]


def _session_shapes(session) -> dict:
    """{"inputs"|"outputs": {name: [dim, ...]}} as onnxruntime reads a graph, "?" for a free dim."""
    def dims(shape) -> list:
        return [d if isinstance(d, int) else "?" for d in shape]

    return {"inputs": {v.name: dims(v.shape) for v in session.get_inputs()},
            "outputs": {v.name: dims(v.shape) for v in session.get_outputs()}}


class OnnxCaptioner(CaptionEngine):
    """The exported encoder and decoder step of a model folder: the ONNX engine of captioning/search.py."""

    record_engine = {"engine": "onnx"}

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError("the ONNX engine needs onnxruntime: pip install 'show-attend-tell[export]'") from None
        folder = Path(folder)
        if not (folder / "onnx.json").is_file():
            raise OnnxModelError(f"{folder} holds no ONNX graphs (no onnx.json); write them with "
                                 "'captioning export --checkpoint CKPT --out DIR --format onnx'")
        # The folder is checked as the PyTorch loader checks it (vocabulary fingerprint, config
        # ranges), and onnx.json against config.json, before any graph is loaded.
        try:
            folder_meta, cfg, vocab = read_folder_meta(folder)
            meta = read_onnx_meta(folder, cfg)
        except CheckpointError as err:
            raise OnnxModelError(err) from None
        self.meta, self.hard_mode = meta, meta.get("hard_mode")
        # The exported step attends in one way only: its one hard mode, or none (soft).
        super().__init__(cfg, vocab, folder_meta.get("training_data"), (self.hard_mode,) if self.hard_mode else ())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.encoder, self.step = (ort.InferenceSession(str(folder / meta[role]), options,
                                                            providers=["CPUExecutionProvider"]) for role in ROLES)
        except Exception as err:  # onnxruntime raises its own types for missing or damaged files
            raise OnnxModelError(f"cannot load the ONNX graphs of {folder}: {one_line(err, 300)}") from None
        fix = "export it again with 'captioning export --format onnx'"
        try:
            for role, session in zip(ROLES, (self.encoder, self.step)):
                check_graph_shapes(folder / meta[role], meta["shapes"].get(role), _session_shapes(session), fix)
        except CheckpointError as err:
            raise OnnxModelError(err) from None

    # ------------------------------------------------------------------------------ images

    def preprocess(self, image) -> np.ndarray:
        """An image (see :meth:`open`) -> [3, S, S] float32, as captioning.data.transforms.preprocess gives."""
        img = self.open(image)
        x = np.asarray(resize_square(img, self.image_size), dtype=np.float32) / np.float32(255)
        x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    # ------------------------------------------------------------------------------ decoding

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """images [B, 3, S, S] -> features [B, L, D], keys [B, L, K], h_0, c_0 [B, n]."""
        return tuple(self.encoder.run(None, {"images": images.astype(np.float32, copy=False)}))

    def decoder_step(self, images: np.ndarray, options: DecodeOptions, seed: int | None = None) -> _OnnxStep:
        """The exported step graph over these images; ``seed`` makes sampled words repeatable."""
        return _OnnxStep(self, images, NumpyOps(np.random.default_rng(seed)))


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first (ties: lower index first)."""
    part = np.argpartition(-x, k - 1, axis=1)[:, :k] if k < x.shape[1] else np.broadcast_to(np.arange(x.shape[1]), x.shape)
    vals = np.take_along_axis(x, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1)
