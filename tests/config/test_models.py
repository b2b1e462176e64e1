"""The config models' public surface (kvferry/config/models.py and the section modules)."""

from __future__ import annotations

import pydantic
import pytest

import kvferry.config.models as models
from kvferry.config.common import ConfigModel


def test_every_exported_name_is_there() -> None:
    for name in models.__all__:
        assert getattr(models, name) is not None, name


def test_sections_are_the_whole_config_and_all_config_models() -> None:
    assert list(models.SECTIONS) == list(models.KvferryConfig.model_fields)
    for name, section in models.SECTIONS.items():
        assert issubclass(section, ConfigModel), name
        assert models.KvferryConfig.model_fields[name].annotation is section, name


@pytest.mark.parametrize("base", [models.ConfigModel, models._Model])
def test_a_section_defined_elsewhere_is_frozen_and_strict(base: type[ConfigModel]) -> None:
    """What a component owning its own section (backends/memory.py) gets from the base; the old
    private name ``_Model`` still gives the same."""

    class Section(base):  # type: ignore[valid-type,misc]
        size: int = 1

    section = Section(size=2)
    assert isinstance(section, ConfigModel) and section.size == 2
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        Section(sise=2)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        section.size = 3
