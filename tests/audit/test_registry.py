"""The model registry: content addresses, lineage, heads, rollback that deletes nothing."""

import sqlite3
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedguard.audit.registry import (
    ModelRegistry,
    RegistryError,
    canonical_weights_bytes,
    weights_sha256,
)
from fedguard.core.errors import FedguardError

CONFIG = {"dataset": "breast-cancer", "rounds": 3}


def _weights(seed: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict(
        [
            ("net.0.weight", rng.normal(size=(4, 3)).astype(np.float32)),
            ("net.0.bias", rng.normal(size=4).astype(np.float32)),
        ]
    )


def _register_run(registry: ModelRegistry, run_id: str, rounds: int = 3) -> list[str]:
    parent = None
    hashes = []
    for r in range(rounds + 1):
        record = registry.register(
            _weights(100 * len(run_id) + r) if r else _weights(0),
            run_id=run_id,
            round=r,
            parent_sha256=parent,
            config=CONFIG,
            metrics={"accuracy": 0.5 + r / 10, "loss": float("nan") if r == 0 else 0.3},
        )
        parent = record.sha256
        hashes.append(record.sha256)
    return hashes


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    with ModelRegistry.open(tmp_path / "registry") as reg:
        yield reg


def test_content_hash_ignores_key_order_and_layout_but_not_values() -> None:
    w = _weights(1)
    reordered = OrderedDict(reversed(list(w.items())))
    fortran = OrderedDict((k, np.asfortranarray(v)) for k, v in w.items())
    big_endian = OrderedDict((k, v.astype(">f4")) for k, v in w.items())
    assert weights_sha256(w) == weights_sha256(reordered) == weights_sha256(fortran)
    assert weights_sha256(w) == weights_sha256(big_endian)
    changed = OrderedDict(w)
    changed["net.0.bias"] = changed["net.0.bias"].copy()
    changed["net.0.bias"][0] = np.nextafter(changed["net.0.bias"][0], np.float32(9))
    assert weights_sha256(changed) != weights_sha256(w)
    as_float64 = OrderedDict((k, v.astype(np.float64)) for k, v in w.items())
    assert weights_sha256(as_float64) != weights_sha256(w)  # dtype is part of the content
    renamed = OrderedDict(("x." + k, v) for k, v in w.items())
    assert weights_sha256(renamed) != weights_sha256(w)
    assert len(canonical_weights_bytes(w)) > sum(v.nbytes for v in w.values())


def test_register_get_list_and_lineage(registry: ModelRegistry) -> None:
    hashes = _register_run(registry, "run-a")
    record = registry.get(hashes[2][:8])
    assert record.sha256 == hashes[2]
    assert record.parent_sha256 == hashes[1]
    assert (record.run_id, record.round) == ("run-a", 2)
    assert record.config == CONFIG
    assert record.metrics["accuracy"] == pytest.approx(0.7)
    assert registry.get(hashes[0]).metrics["loss"] == "NaN"  # stored as valid JSON
    assert record.num_parameters == 16
    assert [m.round for m in registry.list("run-a")] == [0, 1, 2, 3]
    assert [m.sha256 for m in registry.lineage(hashes[3])] == hashes[::-1]
    assert registry.head("run-a").sha256 == hashes[3]  # type: ignore[union-attr]
    assert [m.is_head for m in registry.list("run-a")] == [False, False, False, True]
    np.testing.assert_array_equal(
        registry.load_weights(hashes[1])["net.0.weight"], _weights(501)["net.0.weight"]
    )
    assert list(registry.load_weights(hashes[1])) == ["net.0.weight", "net.0.bias"]
    assert (registry.root / "blobs" / f"{hashes[1]}.npz").is_file()


def test_rollback_moves_the_head_and_keeps_history(registry: ModelRegistry) -> None:
    hashes = _register_run(registry, "run-a")
    record = registry.rollback(hashes[1][:10], reason="round 2 was poisoned")
    assert record.sha256 == hashes[1] and record.is_head
    assert registry.head("run-a").sha256 == hashes[1]  # type: ignore[union-attr]
    assert len(registry.list("run-a")) == 4  # nothing deleted
    events = registry.head_history("run-a")
    assert [e.action for e in events] == ["register"] * 4 + ["rollback"]
    assert events[-1].previous_sha256 == hashes[3]
    assert events[-1].reason == "round 2 was poisoned"
    registry.rollback(hashes[3])
    assert registry.head("run-a").sha256 == hashes[3]  # type: ignore[union-attr]
    assert registry.load_weights(hashes[2])  # rolled-over models stay loadable


def test_registration_is_idempotent_and_a_round_never_changes(registry: ModelRegistry) -> None:
    hashes = _register_run(registry, "run-a", rounds=1)
    again = registry.register(
        _weights(501), run_id="run-a", round=1, parent_sha256=hashes[0], config=CONFIG
    )
    assert again.sha256 == hashes[1]
    assert len(registry.list("run-a")) == 2
    with pytest.raises(RegistryError, match="refusing to replace"):
        registry.register(
            _weights(7), run_id="run-a", round=1, parent_sha256=hashes[0], config=CONFIG
        )


def test_same_content_in_two_runs(registry: ModelRegistry) -> None:
    a = _register_run(registry, "run-a", rounds=1)
    b = _register_run(registry, "run-bb", rounds=1)
    assert a[0] == b[0]  # the same seeded initial model
    assert registry.get(a[0]).run_id == "run-a"  # the earliest registration
    assert registry.get(a[0], run_id="run-bb").run_id == "run-bb"
    assert registry.runs() == ["run-a", "run-bb"]
    assert len(registry.list()) == 4


def test_lookups_fail_with_reasons(registry: ModelRegistry) -> None:
    _register_run(registry, "run-a")
    with pytest.raises(RegistryError, match="4 to 64 hex digits"):
        registry.get("ab")
    with pytest.raises(RegistryError, match="no registered model"):
        registry.get("ffffffff")
    first = registry.list()[0].sha256
    with pytest.raises(RegistryError, match="not registered"):
        registry.register(_weights(3), run_id="run-x", round=0, parent_sha256="0" * 64, config={})
    with pytest.raises(RegistryError, match="round must be"):
        registry.register(_weights(3), run_id="run-x", round=-1, parent_sha256=first, config={})
    with pytest.raises(RegistryError, match="run_id"):
        registry.register(_weights(3), run_id="", round=0, parent_sha256=None, config={})
    assert issubclass(RegistryError, FedguardError)


def test_an_ambiguous_prefix_is_refused(registry: ModelRegistry) -> None:
    real = registry.register(_weights(1), run_id="run", round=0, parent_sha256=None, config={})
    twin = real.sha256[:6] + ("0" if real.sha256[6] != "0" else "1") + real.sha256[7:]
    registry._conn.execute(  # a second model whose hash shares the first 6 digits
        "INSERT INTO models (sha256, parent_sha256, run_id, round, config_json, metrics_json,"
        " num_parameters, created_at) VALUES (?, NULL, 'run', 1, '{}', '{}', 16, 'now')",
        (twin,),
    )
    with pytest.raises(RegistryError, match="ambiguous"):
        registry.get(real.sha256[:6])
    assert registry.get(real.sha256[:7]).sha256 == real.sha256


def test_a_changed_blob_is_refused(registry: ModelRegistry) -> None:
    hashes = _register_run(registry, "run-a", rounds=1)
    path = registry.blob_path(hashes[1])
    other = ModelRegistry.open(registry.root / "scratch")
    other.register(_weights(999), run_id="x", round=0, parent_sha256=None, config={})
    path.write_bytes(next((registry.root / "scratch" / "blobs").glob("*.npz")).read_bytes())
    other.close()
    with pytest.raises(RegistryError, match="does not hash to its address"):
        registry.load_weights(hashes[1])
    path.unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.load_weights(hashes[1])


def test_survives_reopening_and_refuses_foreign_files(tmp_path: Path) -> None:
    with ModelRegistry.open(tmp_path / "r") as registry:
        hashes = _register_run(registry, "run-a", rounds=1)
    with ModelRegistry.open(tmp_path / "r") as registry:
        assert registry.head("run-a").sha256 == hashes[1]  # type: ignore[union-attr]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(foreign / "registry.sqlite")
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(RegistryError, match="not a fedguard model registry"):
        ModelRegistry.open(foreign)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "registry.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RegistryError, match="not a readable SQLite file"):
        ModelRegistry.open(tmp_path / "junk")
