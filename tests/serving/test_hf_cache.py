"""``place_in_hf_cache``: a built tokenizer laid out as a Hugging Face hub cache entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvferry.errors import ConfigError
from kvferry.serving.tiny_model import place_in_hf_cache


def test_layout_is_what_the_hub_resolves(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"x": 1}')
    (model / "tokenizer_config.json").write_text("{}")
    cache = tmp_path / "hub"
    snapshot = place_in_hf_cache(model, cache, "local/tiny")
    root = cache / "models--local--tiny"
    revision = (root / "refs" / "main").read_text()
    assert snapshot == root / "snapshots" / revision
    assert (snapshot / "tokenizer.json").read_text() == '{"x": 1}'
    assert (snapshot / "tokenizer_config.json").exists()
    assert not (snapshot / "special_tokens_map.json").exists()
    hub = pytest.importorskip("huggingface_hub")
    found = hub.try_to_load_from_cache("local/tiny", "tokenizer.json", cache_dir=str(cache))
    assert found == str(snapshot / "tokenizer.json")


@pytest.mark.parametrize("repo", ["tiny", "a/b/c", "/tiny"])
def test_bad_repo_name(tmp_path: Path, repo: str) -> None:
    with pytest.raises(ConfigError, match="owner/name"):
        place_in_hf_cache(tmp_path, tmp_path / "hub", repo)


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        place_in_hf_cache(tmp_path, tmp_path / "hub")
