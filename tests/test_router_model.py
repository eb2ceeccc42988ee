"""The routing model and core with the real all-MiniLM-L6-v2 embedder: decisions, calibration,
caching (memory + disk), config validation, and the eval/calibrate commands on small files."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aigov.embeddings import LOCAL_MODEL_ID, get_embedder
from aigov.routing import core, model as rmodel
from test_router_gateway import BILLING, CODING, GENERAL, HELD_OUT, LASAGNA, NEGATIVES


@pytest.fixture(scope="module")
def embedder() -> Any:
    return get_embedder("local")


def conf(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"routes": [{"name": "coding", "utterances": CODING, "target": {}},
                                    {"name": "billing", "utterances": BILLING, "target": {}},
                                    {"name": "general", "utterances": GENERAL, "target": {}}],
                         "default_route": "general", "negative_utterances": NEGATIVES}
    c.update(over)
    return c


def test_decisions_and_calibration(embedder: Any) -> None:
    router = core.Router(core.settings_from_config(conf()), embedder)
    m, _ = router.model(wait_s=300)
    assert m.calibration.method == "negatives"
    assert m.calibration.heldout_negatives == len(NEGATIVES)
    assert m.calibration.heldout_inscope == len(CODING) + len(BILLING) + len(GENERAL)
    for route, texts in HELD_OUT.items():
        for t in texts:
            d = router.decide_text(t)
            assert (d.route_name, d.reason) == (route, "matched"), (t, d)
    d = router.decide_text(LASAGNA)
    assert (d.route_name, d.reason) == ("general", "default")
    assert d.score is not None and d.score < router.threshold(m)
    assert router.decide_text("   ").reason == "default"


def test_training_is_deterministic_and_fast(embedder: Any) -> None:
    rng = np.random.default_rng(1)
    # 150 routes x 100 utterances of synthetic unit vectors: the head must train in seconds.
    centers = rng.normal(size=(150, 384)).astype(np.float32)
    labels = np.repeat(np.arange(150), 100)
    vecs = centers[labels] + 0.8 * rng.normal(size=(15000, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    # CPU time, not wall time: the 2 CI cores are shared, so wall time measures the neighbours.
    # One BLAS thread: OpenBLAS's idle threads spin, so on a busy host their CPU time grew 10x.
    from threadpoolctl import threadpool_limits  # installed with sentence-transformers (scikit-learn)

    with threadpool_limits(1):
        t = time.process_time()
        head = rmodel.train_head(vecs, labels, 150)
        elapsed = time.process_time() - t
    assert elapsed < 8, f"head training took {elapsed:.1f}s of CPU"
    with threadpool_limits(1):  # the same BLAS threads: another split sums in another order
        head2 = rmodel.train_head(vecs, labels, 150)
    assert np.array_equal(head.weights, head2.weights)
    assert (head.proba(vecs[:500]).argmax(1) == labels[:500]).mean() > 0.95


def test_topk_similarity_matches_bruteforce() -> None:
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    labels = np.array([0] * 3 + [1] * 30 + [2] * 7)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    got = rmodel.topk_similarity(q, vecs, labels, 3, top_k=5)
    sims = q @ vecs.T
    for r in range(3):
        block = np.sort(sims[:, labels == r], axis=1)[:, ::-1][:, :5]
        np.testing.assert_allclose(got[:, r], block.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_one_large_route_does_not_pad_every_route_to_its_size() -> None:
    """The index's memory follows the utterances, not routes x the largest route (a FAQ route of
    5,000 utterances among 49 small ones padded to 5,000 each took 366 MiB for 7.8 MiB of vectors),
    and it still gives the exact top-k means and k-th-nearest cosines."""
    rng = np.random.default_rng(3)
    counts = [40] * 49 + [5000] + [1, 2, 0]
    labels = np.repeat(np.arange(len(counts)), counts)
    vecs = rng.normal(size=(len(labels), 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = rmodel.SimilarityIndex(vecs, labels, len(counts), top_k=5, knn_k=7)
    assert sum(b.matrix.shape[0] for b in index.blocks) <= 2 * len(labels)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    got, knn = index.search(q, chunk=4)
    sims = q @ vecs.T
    for r, n in enumerate(counts):
        want = np.sort(sims[:, labels == r], axis=1)[:, ::-1][:, :5].mean(axis=1) if n else -np.ones(len(q))
        np.testing.assert_allclose(got[:, r], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(knn, np.sort(sims, axis=1)[:, -7], rtol=1e-5, atol=1e-6)


def test_without_negatives_uses_inscope_quantile(embedder: Any) -> None:
    router = core.Router(core.settings_from_config(conf(negative_utterances=[])), embedder)
    m, _ = router.model(wait_s=300)
    assert m.calibration.method == "inscope_quantile"
    assert router.decide_text(HELD_OUT["coding"][0]).route_name == "coding"


def test_disk_cache_round_trip(embedder: Any, tmp_path: Path) -> None:
    d = tmp_path / "cache"
    settings = core.settings_from_config(conf(cache_dir=str(d), negative_utterances=NEGATIVES[:5]))
    core.clear_model_cache()
    m1, src1 = core.get_model(settings, embedder, 300)
    assert src1 == "built" and len(list(d.glob("router-*.npz"))) == 1
    core.clear_model_cache()  # as a restarted process: memory empty, disk kept
    m2, src2 = core.get_model(settings, embedder, 300)
    assert src2 == "disk"
    q = embedder.embed([LASAGNA, HELD_OUT["billing"][0]])
    s1, s2 = m1.score(q), m2.score(q)
    assert np.array_equal(s1.route_index, s2.route_index)
    np.testing.assert_array_equal(s1.confidence, s2.confidence)
    assert m2.threshold == m1.threshold
    _, src3 = core.get_model(settings, embedder, 300)
    assert src3 == "memory"


def test_disk_cache_refuses_world_writable_dir(embedder: Any, tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    assert core._safe_cache_dir(str(d)) is None


def test_build_failure_is_reported_not_raised() -> None:
    class Down:
        model_id = "down-model"

        def embed(self, texts: list[str]) -> Any:
            raise RuntimeError("connection refused")

    core.clear_model_cache()
    router = core.Router(core.settings_from_config(conf()), Down())
    d = router.decide_text(HELD_OUT["coding"][0], wait_s=5)
    assert (d.route_name, d.reason) == ("general", "error")
    assert "build failed" in d.detail


def test_a_vector_of_another_dimension_takes_the_default_route_with_reason_error(embedder: Any) -> None:
    """A remote embedding model redeployed under the same name with another dimension: scoring
    fails after the model was built, and the request still gets the default route (reason error),
    never skips routing (which would send it on with the client's model and credential)."""
    class Redeployed:
        model_id = embedder.model_id
        dims = 384

        def embed(self, texts: list[str]) -> Any:
            vectors = np.asarray(embedder.embed(texts))
            return vectors if self.dims == 384 else vectors[:, :self.dims]

    core.clear_model_cache()
    redeployed = Redeployed()
    router = core.Router(core.settings_from_config(conf()), redeployed)
    assert router.decide_text(HELD_OUT["coding"][0], wait_s=60).route_name == "coding"
    redeployed.dims = 256
    d = router.decide_text(HELD_OUT["coding"][0], wait_s=60)
    assert (d.route_name, d.reason) == ("general", "error")
    assert "scoring failed" in d.detail


def test_a_dead_embeddings_endpoint_does_not_fail_another_routes_build(mock_llm) -> None:
    # A new user's finding: two routers naming the same embedding model on different endpoints
    # shared one in-memory build, so the dead endpoint's failure answered the live one's requests
    # with reason "error" for BUILD_RETRY_S. Real HTTP embedders (the mock's /v1/embeddings).
    from aigov.devredis import free_port
    from aigov.embeddings import OpenAIEmbedder

    core.clear_model_cache()
    settings = core.settings_from_config(conf(negative_utterances=[]))
    dead = OpenAIEmbedder(f"http://127.0.0.1:{free_port()}/v1/embeddings", "text-embedding-3-small", timeout_s=2)
    live = OpenAIEmbedder(f"{mock_llm.url}/v1/embeddings", "text-embedding-3-small", timeout_s=10)
    with pytest.raises(core.ModelNotReady, match="build failed"):
        core.get_model(settings, dead, 10)
    model, source = core.get_model(settings, live, 30)
    assert source == "built" and model is not None
    with pytest.raises(core.ModelNotReady):  # the dead one still backs off, on its own
        core.get_model(settings, dead, 10)


@pytest.mark.parametrize("bad,needle", [
    ({"default_route": "nowhere"}, "default_route 'nowhere'"),
    ({"default_route": None}, "default_route is required"),
    ({"routes": []}, "at least one route"),
    ({"routes": [{"name": "a", "utterances": ["x"]}, {"name": "a", "utterances": ["y"]}],
      "default_route": "a"}, "appears twice"),
    ({"routes": [{"name": "a", "utterances": ["  "]}], "default_route": "a"}, "at least one utterance"),
    ({"routes": [{"name": "a", "utterances": ["x"], "target": {"upstream": "u", "host": "h"}}],
      "default_route": "a"}, "both upstream and host"),
    ({"routes": [{"name": "a", "utterances": ["x"], "target": {"api_key": "sk-x\n"}}],
      "default_route": "a"}, "target.api_key contains a control character"),
    ({"routes": [{"name": "a", "utterances": ["x"], "target": {"headers": {"x-org": "a\x00"}}}],
      "default_route": "a"}, "target.headers.x-org contains a control character"),
])
def test_config_errors_are_clear(bad: dict[str, Any], needle: str) -> None:
    with pytest.raises(core.RouterConfigError, match=needle):
        core.settings_from_config(conf(**bad))


def test_model_key_ignores_targets_and_keys() -> None:
    a = core.settings_from_config(conf())
    c = conf()
    c["routes"][0]["target"] = {"host": "x", "api_key": "secret"}
    b = core.settings_from_config(c)
    assert a.model_key("m") == b.model_key("m")
    assert a.model_key("m") != a.model_key("other-model")
    assert "secret" not in repr(b.routes[0].target)


def test_schema_is_kong_valid_and_fills_defaults() -> None:
    from aigov.plugins.semantic_router.schema import SCHEMA
    from kongsim.metaschema import ConfigError, process_config, validate_plugin_schema

    validate_plugin_schema({"Name": "llm-semantic-router", "Version": "0.1.0", "Priority": 907,
                            "Phases": ["access"],
                            "Schema": {"name": "llm-semantic-router",
                                       "fields": [{"config": {"type": "record", "fields": SCHEMA}}]}})
    processed = process_config(SCHEMA, conf())
    assert processed["embed_text"] == "last_user" and processed["on_model_mismatch"] == "error"
    assert processed["routes"][0]["target"]["auth_header"] == "Authorization"
    assert processed["force_route_header"] is None
    with pytest.raises(ConfigError):
        process_config(SCHEMA, conf(embed_text="everything"))


# --- commands ---------------------------------------------------------------------------------

def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    train = [{"text": t, "route": "coding"} for t in CODING] + \
            [{"text": t, "route": "billing"} for t in BILLING] + \
            [{"text": t, "route": None} for t in NEGATIVES]
    test = [{"text": t, "route": r} for r, ts in HELD_OUT.items() for t in ts] + \
           [{"text": LASAGNA, "route": None}, {"text": "what's the population of brazil", "route": None}]
    # CLINC150's format is accepted directly
    clinc = [{"text": t, "intent": "coding"} for t in CODING] + [{"text": t, "intent": "oos"} for t in NEGATIVES]
    return {"train": _write(tmp_path / "train.jsonl", train), "test": _write(tmp_path / "test.jsonl", test),
            "clinc": _write(tmp_path / "clinc.jsonl", clinc),
            "nonneg": _write(tmp_path / "noneg.jsonl", train[:len(CODING) + len(BILLING)])}


def test_eval_router_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from aigov.cli import main

    assert main(["eval", "router", "--train", str(files["train"]), "--test", str(files["test"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"in_scope_accuracy", "oos_recall", "routes", "test_size", "p50_ms"} <= set(out)
    assert out["routes"] == 2 and out["test_size"] == 6
    assert out["in_scope_accuracy"] == 1.0 and out["oos_recall"] == 1.0
    assert out["p50_ms"] > 0


def test_eval_router_text_and_clinc_format(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from aigov.cli import main

    assert main(["eval", "router", "--train", str(files["clinc"]), "--test", str(files["test"]),
                 "--per-route", "5"]) == 0
    out = capsys.readouterr().out
    assert "in-scope accuracy" in out and "out-of-scope recall" in out and "routes: 1" in out


def test_eval_router_with_plugin_config(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from aigov.cli import main

    kong = {"_format_version": "3.0", "plugins": [{"name": "llm-semantic-router", "config": conf()}]}
    p = tmp_path / "kong.yml"
    p.write_text(json.dumps(kong))  # JSON is YAML
    assert main(["eval", "router", "--routes", str(p), "--test", str(files["test"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routes"] == 3 and out["default_route"] == "general"


def test_eval_router_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aigov.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["eval", "router", "--train", str(bad), "--test", str(bad)]) == 2
    assert "needs 'route'" in capsys.readouterr().err


def test_calibrate_refuses_without_negatives(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from aigov.cli import main

    assert main(["calibrate", "router", "--train", str(files["nonneg"])]) == 3
    assert "refusing to calibrate" in capsys.readouterr().err


def test_calibrate_prints_tradeoff_and_config(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from aigov.cli import main

    assert main(["calibrate", "router", "--train", str(files["train"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated_for_model"] == LOCAL_MODEL_ID
    assert out["source"] == "out-of-fold" and out["tradeoff"]
    # With held-out data (which has out-of-scope lines) even training without negatives works.
    assert main(["calibrate", "router", "--train", str(files["nonneg"]), "--heldout", str(files["test"])]) == 0
    text = capsys.readouterr().out
    assert "trade-off" in text and '"min_confidence"' in text


# --- centring (issue 5 accuracy work) ---------------------------------------------------------

def _clustered(routes: int, per_route: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors around route centres that share a large common direction, as MiniLM's do."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=384).astype(np.float32) * 3.0
    centres = rng.normal(size=(routes, 384)).astype(np.float32) + common
    labels = np.repeat(np.arange(routes), per_route)
    vecs = centres[labels] + 1.5 * rng.normal(size=(len(labels), 384)).astype(np.float32)
    negs = common + 1.5 * rng.normal(size=(30, 384)).astype(np.float32)
    for a in (vecs, negs):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
    return vecs, labels, negs


def test_many_routes_are_centred_and_round_trip() -> None:
    vecs, labels, negs = _clustered(12, 8, seed=3)
    names = [f"r{i}" for i in range(12)]
    m = rmodel.fit(names, vecs, labels, negs)
    assert m.center is not None
    np.testing.assert_allclose(m.center, np.concatenate([vecs, negs]).mean(axis=0), atol=1e-5)
    # Stored utterances live in the centred space; queries are centred by score() itself.
    np.testing.assert_allclose(m.vectors, rmodel.center_vectors(vecs, m.center), atol=1e-6)
    assert m.top_k == 5  # min(DEFAULT_TOP_K, 8 utterances)
    arrays, meta = m.to_arrays()
    m2 = rmodel.RouterModel.from_arrays(arrays, meta)
    q = vecs[::7]
    s1, s2 = m.score(q), m2.score(q)
    np.testing.assert_array_equal(s1.route_index, s2.route_index)
    np.testing.assert_array_equal(s1.confidence, s2.confidence)
    assert (s1.route_index == labels[::7]).mean() > 0.9


def test_few_routes_are_not_centred() -> None:
    vecs, labels, negs = _clustered(3, 8, seed=4)
    m = rmodel.fit(["a", "b", "c"], vecs, labels, negs)
    assert m.center is None
    np.testing.assert_array_equal(m.vectors, vecs)
    arrays, meta = m.to_arrays()
    assert rmodel.RouterModel.from_arrays(arrays, meta).center is None


def test_centring_keeps_off_topic_prompts_out() -> None:
    # Negatives sit on the shared direction: after centring they must still score below the
    # threshold more often than the calibration target allows them through.
    vecs, labels, negs = _clustered(20, 10, seed=5)
    m = rmodel.fit([f"r{i}" for i in range(20)], vecs, labels, negs[:15])
    held_out_negs = negs[15:]
    assert (m.score(held_out_negs).confidence < m.threshold).mean() >= 0.8
    assert m.calibration.method == "negatives"


def test_old_model_format_is_refused() -> None:
    vecs, labels, negs = _clustered(3, 4, seed=6)
    arrays, meta = rmodel.fit(["a", "b", "c"], vecs, labels, negs).to_arrays()
    with pytest.raises(rmodel.RouterModelError, match="format 1"):
        rmodel.RouterModel.from_arrays(arrays, {**meta, "format": 1})


def test_mismatched_negative_vectors_are_a_clear_error() -> None:
    vecs, labels, _ = _clustered(3, 4, seed=7)
    with pytest.raises(rmodel.RouterModelError, match="negative vectors"):
        rmodel.fit(["a", "b", "c"], vecs, labels, np.ones((2, 10), np.float32))


@pytest.mark.parametrize("per_route,k", [(1, 1), (3, 3), (5, 5), (10, 5), (100, 5)])
def test_default_top_k(per_route: int, k: int) -> None:
    assert rmodel.default_top_k(per_route) == k


def test_a_dotted_target_header_name_is_a_config_error() -> None:
    # Kong's log serializer nests dotted keys, so such a header's value could not be masked.
    from aigov.routing.core import RouterConfigError, settings_from_config

    conf = {"default_route": "a", "routes": [{"name": "a", "utterances": ["hello there"],
                                              "target": {"model": "gpt-4o-mini", "api_key": "sk-x",
                                                         "auth_header": "x.api.key"}}]}
    with pytest.raises(RouterConfigError, match="x.api.key"):
        settings_from_config(conf)
    conf["routes"][0]["target"] = {"model": "gpt-4o-mini", "headers": {"x.goog.key": "v"}}
    with pytest.raises(RouterConfigError, match="x.goog.key"):
        settings_from_config(conf)
    # A tester's Transfer-Encoding broke every routed request (the upstream answered 411).
    for framing in ("Transfer-Encoding", "content-length", "Host"):
        conf["routes"][0]["target"] = {"model": "gpt-4o-mini", "headers": {framing: "chunked"}}
        with pytest.raises(RouterConfigError, match=f"header '{framing}' frames or addresses"):
            settings_from_config(conf)


@pytest.mark.parametrize("target,where", [
    ({"headers": {"x-org": "acme\r\nx-injected: 1"}}, "headers"),
    ({"headers": {"x.goog.key": "v"}}, "headers"),
    ({"auth_header": "x.api.key", "api_key": "sk-x"}, "auth_header"),
    ({"auth_header": "x-key\n", "api_key": "sk-x"}, "auth_header"),
    ({"auth_prefix": "Bearer\r\n", "api_key": "sk-x"}, "auth_prefix"),
    ({"headers": {"x-org": "acme\x00"}}, "headers"),            # NUL
    ({"headers": {"x-org": "\x1b[31macme"}}, "headers"),        # an escape sequence
    ({"auth_prefix": "Key\x7f", "api_key": "sk-x"}, "auth_prefix"),  # DEL
    ({"api_key": "sk-acme-literal\n"}, "api_key"),  # a YAML `|` block keeps the final newline
])
def test_the_schema_refuses_header_names_and_values_the_router_could_not_send(target: dict, where: str) -> None:
    # A new user's CRLF in a target header value passed the schema, then raised in the stand-in on
    # every request (ngx.req.set_header refuses it in Kong): now the config does not load.
    from aigov.plugins.semantic_router.schema import SCHEMA
    from kongsim import metaschema

    conf = {"default_route": "a", "routes": [{"name": "a", "utterances": ["hello there"],
                                              "target": {"model": "gpt-4o-mini", **target}}]}
    with pytest.raises(metaschema.ConfigError, match=f"target.{where}") as err:
        metaschema.process_config(SCHEMA, conf, "llm-semantic-router")
    assert "acme" not in str(err.value)  # a value (it may be a credential) is never echoed back
    fine = {"default_route": "a", "routes": [{"name": "a", "utterances": ["hello there"], "target": {
        "model": "gpt-4o-mini", "headers": {"OpenAI-Organization": "org-1", "x_team": "a b"},
        "auth_header": "api-key", "auth_prefix": "Key ", "api_key": "sk-x"}}]}
    metaschema.process_config(SCHEMA, fine, "llm-semantic-router")


def test_an_embeddings_key_with_a_control_character_fails_without_showing_it() -> None:
    # http.client refuses such a header on every call, with the header's value in its message,
    # which the plugins log: the embedder refuses the key itself and names only the field.
    from aigov.embeddings import EmbeddingError, OpenAIEmbedder

    with pytest.raises(EmbeddingError, match="api_key contains a control character") as err:
        OpenAIEmbedder("http://127.0.0.1:9/v1/embeddings", "text-embedding-3-small", api_key="sk-secret-1\n")
    assert "sk-secret-1" not in str(err.value)
    with pytest.raises(core.RouterConfigError, match="embeddings.api_key contains a control character"):
        core.settings_from_config(conf(embeddings={"provider": "openai", "api_key": "sk-secret-1\r\n"}))


def test_an_embeddings_url_with_credentials_works_and_never_shows_them(mock_llm) -> None:
    # A key in ?key= or user:pass@ was printed in every failure message (a breaker found it), and
    # urllib took user:pass@ for part of the host name, so the endpoint never answered.
    from aigov.devredis import free_port
    from aigov.embeddings import EmbeddingError, OpenAIEmbedder

    host = mock_llm.url.split("//", 1)[1]
    live = OpenAIEmbedder(f"http://us%40er:p%3Ass-SECRET1@{host}/v1/embeddings?key=QSECRET2", "text-embedding-3-small")
    assert live.embed(["hello"]).shape[0] == 1
    import base64

    from aigov.mockllm import auth_fingerprint
    seen = mock_llm.stats.snapshot()["recent"][-1]
    basic = base64.b64encode(b"us@er:p:ss-SECRET1").decode()
    assert (seen["auth_header"], seen["auth_sha256"]) == ("authorization", auth_fingerprint(f"Basic {basic}"))
    dead = OpenAIEmbedder(f"http://user:SECRET1@127.0.0.1:{free_port()}/v1/embeddings?key=QSECRET2",
                          "text-embedding-3-small", timeout_s=2)
    with pytest.raises(EmbeddingError) as err:
        dead.embed(["hello"])
    assert "SECRET1" not in str(err.value) and "QSECRET2" not in str(err.value) and "/v1/embeddings" in str(err.value)
    assert "SECRET" not in repr(dead) and "SECRET" not in repr(live)


def test_the_routers_openai_embedder_needs_url_and_model_at_load() -> None:
    # The cache refused this at load; the router's embeddings record had no such checks.
    from aigov.plugins.semantic_router.schema import SCHEMA
    from kongsim import metaschema

    routes = [{"name": "a", "utterances": ["hello there"], "target": {"model": "gpt-4o-mini"}}]
    for missing in ("url", "model"):
        emb = {"provider": "openai", "url": "http://127.0.0.1:9/v1/embeddings", "model": "text-embedding-3-small"}
        del emb[missing]
        with pytest.raises(metaschema.ConfigError, match=f"config.embeddings.{missing}: required field missing"):
            metaschema.process_config(SCHEMA, {"default_route": "a", "routes": routes, "embeddings": emb},
                                      "llm-semantic-router")
    metaschema.process_config(SCHEMA, {"default_route": "a", "routes": routes}, "llm-semantic-router")


def test_calibrated_for_model_accepts_the_model_name_without_its_hub_organisation(embedder: Any) -> None:
    """Written by hand as "all-MiniLM-L6-v2" (the short name), it is the same model: no 500 on every
    request. Another model is still a mismatch."""
    short = LOCAL_MODEL_ID.rsplit("/", 1)[-1]
    for named in (LOCAL_MODEL_ID, short, short.upper()):
        router = core.Router(core.settings_from_config(conf(calibrated_for_model=named,
                                                            thresholds={"min_confidence": 0.5})), embedder)
        assert router.mismatch is None and router.configured_threshold == 0.5, named
    other = core.Router(core.settings_from_config(conf(calibrated_for_model="text-embedding-3-small")), embedder)
    assert other.mismatch and other.config_error
    # Both directions (a remote embedder may serve the model under its short name, while
    # `aigov calibrate router` writes the full id), and two organisations must agree.
    assert core._same_model("sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2")
    assert core._same_model("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
    assert not core._same_model("someone/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
    assert not core._same_model("all-MiniLM-L12-v2", "sentence-transformers/all-MiniLM-L6-v2")
