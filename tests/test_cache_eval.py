"""`aigov eval cache` on the STS-B validation split: --store redis (real Redis with RediSearch)
gives the same figures as --store memory, and --json prints the documented keys.

The CLI runs in this process (aigov.cli.main) so MiniLM loads once for all runs. Embedding the
whole split takes ~20 s on a busy 2-core CI box per run, so the runs use the first SUBSET labelled
pairs, written to pytest's temporary directory (never into the repo).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aigov.cache.core import DEFAULT_THRESHOLD
from aigov.cli import main as aigov_main
from aigov.eval.cache import load_pairs
from conftest import shared_data

JSON_KEYS = {"precision", "recall", "false_hit_rate", "threshold", "pairs"}
SWEEP = "0.75,0.82,0.9"
SUBSET = 80



@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first SUBSET labelled STS-B validation lines, unchanged (label null lines skipped)."""
    kept = []
    for line in shared_data("stsb", "validation.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip() and json.loads(line).get("label") is not None:
            kept.append(line)
        if len(kept) == SUBSET:
            break
    path = tmp_path_factory.mktemp("stsb") / "validation-subset.jsonl"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return path


def _eval(capsys: pytest.CaptureFixture[str], pairs: Path, *args: str) -> Any:
    capsys.readouterr()
    code = aigov_main(["eval", "cache", "--pairs", str(pairs), "--json", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_redis_store_gives_the_memory_figures(capsys: pytest.CaptureFixture[str], redis_server: Any,
                                              pairs_file: Path) -> None:
    if not redis_server.running:
        redis_server.start()
    labelled = load_pairs(pairs_file)
    positives = sum(1 for _, _, same in labelled if same)
    assert len(labelled) == SUBSET and 0 < positives < SUBSET
    memory = _eval(capsys, pairs_file, "--store", "memory", "--sweep", SWEEP)
    redis = _eval(capsys, pairs_file, "--store", "redis", "--redis-url", redis_server.url, "--sweep", SWEEP)
    assert [r["threshold"] for r in memory] == [0.75, 0.82, 0.9]
    assert [r["store"] for r in memory + redis] == ["memory"] * 3 + ["redis"] * 3
    strip = lambda rows: [{k: v for k, v in r.items() if k != "store"} for r in rows]  # noqa: E731
    assert strip(memory) == strip(redis)  # precision, recall, false_hit_rate, hits... per threshold
    for row in memory:  # figures consistent with the counts, not placeholders
        true_hits = row["hits"] - row["false_hits"]
        assert row["pairs"] == len(labelled) and row["positives"] == positives
        assert row["precision"] == (round(true_hits / row["hits"], 4) if row["hits"] else 1.0)
        assert row["recall"] == round(true_hits / positives, 4)
        assert row["false_hit_rate"] == round(row["false_hits"] / (len(labelled) - positives), 4)
    hits = [r["hits"] for r in memory]
    assert hits == sorted(hits, reverse=True) and hits[0] > hits[-1]  # stricter never adds hits
    # the redis run cleans up after itself
    client = redis_server.client()
    try:
        assert list(client.scan_iter(match="aigov:cache:eval-*")) == []
    finally:
        client.close()

    # --json without --sweep: one object with the documented keys, the default threshold's row
    single = _eval(capsys, pairs_file, "--store", "memory")
    assert JSON_KEYS <= set(single)
    assert single["threshold"] == DEFAULT_THRESHOLD == memory[1]["threshold"]
    for key in ("precision", "recall", "false_hit_rate", "pairs", "hits", "false_hits"):
        assert single[key] == memory[1][key], key


def test_distance_like_threshold_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = aigov_main(["eval", "cache", "--pairs", str(shared_data("stsb", "validation.jsonl")), "--threshold", "0.2", "--json"])
    # refused before any pair is embedded
    err = capsys.readouterr().err
    assert code == 2 and "distance" in err
