"""Settings: defaults file stays true, env beats YAML, unsafe combinations refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from imagegenx.settings import Settings, hash_api_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_service_env(clean_env: None) -> None:
    """These tests read settings from the code defaults only."""


def test_defaults_yaml_matches_the_code_defaults() -> None:
    documented = yaml.safe_load((REPO / "configs" / "defaults.yaml").read_text())
    code = Settings().model_dump(mode="json")
    assert documented == code


def test_env_overrides_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_batch: 4\nmax_wait_ms: 20\n")
    monkeypatch.setenv("IMAGEGENX_CONFIG", str(cfg))
    monkeypatch.setenv("IMAGEGENX_MAX_BATCH", "12")
    s = Settings()
    assert (s.max_batch, s.max_wait_ms) == (12, 20)


def test_presets_load() -> None:
    for path in (REPO / "configs").glob("*.yaml"):
        Settings(**yaml.safe_load(path.read_text()))


def test_api_keys_are_comma_separated_and_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGENX_API_KEYS", "alpha, beta")
    monkeypatch.setenv("IMAGEGENX_API_KEY_HASHES", hash_api_key("gamma"))
    assert Settings().key_digests() == {hash_api_key(k) for k in ("alpha", "beta", "gamma")}


def test_prefetch_holds_two_batches() -> None:
    assert Settings(max_batch=8, scheduler="request").prefetch == 16
    assert Settings(max_batch=8, scheduler="step").prefetch == 24  # images outside guidance: 1 row


def test_visibility_timeout_must_cover_buffer_and_run() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(visibility_timeout_s=100, expected_batch_s=60)


def test_worst_wait_counts_every_batch_of_the_prefetch_window() -> None:
    # The step scheduler holds one max_batch more, so a message may wait one batch longer.
    request = Settings(scheduler="request", max_batch=8, max_wait_ms=50, expected_batch_s=60)
    step = Settings(scheduler="step", max_batch=8, max_wait_ms=50, expected_batch_s=60)
    assert request.worst_wait_s == pytest.approx(0.05 + 2 * 60)
    assert step.worst_wait_s == pytest.approx(0.05 + 3 * 60)
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(scheduler="step", visibility_timeout_s=150, expected_batch_s=60, webhook_backoff_max_s=60)
    assert Settings(scheduler="request", visibility_timeout_s=150, expected_batch_s=60,
                    webhook_backoff_max_s=60).worst_wait_s < 150


def test_num_images_cannot_exceed_batch() -> None:
    with pytest.raises(ValidationError, match="max_num_images"):
        Settings(max_batch=2, max_num_images=4)
