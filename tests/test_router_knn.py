"""Issue 5, third round: the confidence gains a deep-nearest-neighbour term (the raw cosine of
the query to its k-th nearest route utterance over all routes). Synthetic vectors where the
property is arithmetic; the real MiniLM where the text matters (and CLINC150 when present)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from aigov.embeddings import get_embedder
from aigov.routing import core, model as rmodel
from test_router_gateway import BILLING, CODING, GENERAL, HELD_OUT, LASAGNA, NEGATIVES
from test_router_model import _clustered
from conftest import shared_data



@pytest.fixture(scope="module")
def embedder() -> Any:
    return get_embedder("local")


def _kth_raw_cosine(queries: np.ndarray, utterances: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.sort(q @ utterances.T, axis=1)[:, ::-1][:, k - 1]


@pytest.mark.parametrize("routes,sizes", [(12, None), (12, "uneven"), (3, None)])
def test_neighbour_similarity_is_the_raw_kth_cosine(routes: int, sizes: str | None) -> None:
    # >= CENTER_MIN_ROUTES routes are centred: the term must still be the cosine in the raw space
    # (recovered from the centred grid), padding (uneven routes) must never be a neighbour.
    vecs, labels, negs = _clustered(routes, 40, seed=21)
    if sizes == "uneven":
        keep = np.ones(len(labels), bool)
        keep[(labels == 0) & (np.arange(len(labels)) % 40 >= 5)] = False  # route 0: 5 utterances
        vecs, labels = vecs[keep], labels[keep]
    m = rmodel.fit([f"r{i}" for i in range(routes)], vecs, labels, negs, calibrate=False)
    assert (m.center is not None) == (routes >= rmodel.CENTER_MIN_ROUTES)
    expected_k, expected_w = rmodel.default_knn(len(vecs) / routes)
    assert (m.knn_k, m.knn_weight) == (expected_k, pytest.approx(expected_w)) and m.knn_k >= 3
    rng = np.random.default_rng(22)
    queries = np.concatenate([negs, vecs[::9] + 0.1 * rng.normal(size=vecs[::9].shape).astype(np.float32)])
    s = m.score(queries)
    np.testing.assert_allclose(s.neighbour_similarity, _kth_raw_cosine(queries, vecs, m.knn_k), atol=2e-5)


def test_knn_schedule_follows_utterances_per_route() -> None:
    assert rmodel.default_knn(100) == (10, pytest.approx(100 / 130))
    assert rmodel.default_knn(10) == (1, pytest.approx(0.25))
    assert rmodel.default_knn(3)[0] == 1
    assert rmodel.default_knn(0) == (0, 0.0)


def test_knn_weight_zero_drops_the_term_and_formats_round_trip() -> None:
    vecs, labels, negs = _clustered(12, 20, seed=23)
    names = [f"r{i}" for i in range(12)]
    off = rmodel.fit(names, vecs, labels, negs, knn_weight=0.0)
    on = rmodel.fit(names, vecs, labels, negs)
    assert off.knn_k == 0 and on.knn_k == 2 and on.knn_weight > 0
    q = np.concatenate([negs[:10], vecs[::13]])
    s_off, s_on = off.score(q), on.score(q)
    assert np.all(s_off.neighbour_similarity == 0.0)
    # Same head, neighbours and offsets (the offsets are fitted without the term): the two
    # confidences differ by exactly the weighted term.
    np.testing.assert_allclose(s_on.confidence - s_off.confidence,
                               on.knn_weight * s_on.neighbour_similarity, atol=1e-5)
    arrays, meta = on.to_arrays()
    assert meta["format"] == 4 and meta["knn_k"] == on.knn_k
    loaded = rmodel.RouterModel.from_arrays(arrays, json.loads(json.dumps(meta)))  # meta as on disk
    s_loaded = loaded.score(q)
    np.testing.assert_array_equal(s_loaded.confidence, s_on.confidence)
    np.testing.assert_array_equal(s_loaded.route_index, s_on.route_index)


def test_off_topic_prompts_have_fewer_close_neighbours(embedder: Any) -> None:
    conf = {"routes": [{"name": "coding", "utterances": CODING, "target": {}},
                       {"name": "billing", "utterances": BILLING, "target": {}},
                       {"name": "general", "utterances": GENERAL, "target": {}}],
            "default_route": "general", "negative_utterances": NEGATIVES}
    router = core.Router(core.settings_from_config(conf), embedder)
    m, _ = router.model(wait_s=300)
    assert m.knn_k >= 1 and m.knn_weight > 0
    in_scope = [t for route in ("coding", "billing") for t in HELD_OUT[route]]
    off_topic = [LASAGNA, "how tall is mount kilimanjaro", "what is the boiling point of water at high altitude"]
    s_in, s_off = m.score(embedder.embed(in_scope)), m.score(embedder.embed(off_topic))
    assert s_off.neighbour_similarity.max() < s_in.neighbour_similarity.min()
    assert (s_off.confidence < m.threshold).all()
    assert (s_in.confidence >= m.threshold).all()


def _clinc(split: str) -> list[tuple[str, str | None]]:
    rows = [json.loads(line) for line in shared_data("clinc150", f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [(r["text"], None if r["intent"] == "oos" else r["intent"]) for r in rows]


def test_neighbour_term_separates_clinc_out_of_scope(embedder: Any) -> None:
    # 20 intents x 20 utterances (+ the 100 train "oos" lines as negatives), scored on those
    # intents' validation lines and the 100 validation "oos" ones: ~1,000 embeddings.
    train, test = _clinc("train"), _clinc("validation")
    intents = list(dict.fromkeys(r for _, r in train if r is not None))[:20]
    per_route = {i: [t for t, r in train if r == i][:20] for i in intents}
    negatives = [t for t, r in train if r is None]
    test = [(t, r) for t, r in test if r is None or r in per_route]
    texts = [t for i in intents for t in per_route[i]]
    labels = np.array([k for k, i in enumerate(intents) for _ in per_route[i]])
    vecs = np.asarray(embedder.encode_direct(texts + negatives + [t for t, _ in test]), np.float32)
    n_pos, n_neg = len(texts), len(negatives)
    m = rmodel.fit(intents, vecs[:n_pos], labels, vecs[n_pos:n_pos + n_neg])
    s = m.score(vecs[n_pos + n_neg:])
    is_in = np.array([r is not None for _, r in test])
    nn = s.neighbour_similarity
    # Deep-kNN alone ranks an in-scope line above an out-of-scope one ~97% of the time here.
    auroc = float((nn[is_in][:, None] > nn[~is_in][None, :]).mean())
    assert auroc > 0.93, auroc
    truth = np.array([intents.index(r) if r else -1 for _, r in test])
    routed = float(((s.route_index == truth) & (s.confidence >= m.threshold))[is_in].mean())
    rejected = float((s.confidence < m.threshold)[~is_in].mean())
    assert routed > 0.93 and rejected > 0.7, (routed, rejected)
