"""docs/configuration.md's field tables are generated from the comments beside the config fields
(pirl_tools/config_docs.py): every field has one, and the committed file is what the generator writes."""

from pirl_tools import config_docs


def test_every_marked_config_has_a_comment_beside_each_field():
    targets = config_docs.MARKER.findall(config_docs.DOC.read_text())
    assert len(targets) >= 3
    for _, target, *_ in targets:
        assert config_docs.undocumented(config_docs.resolve(target)) == [], target


def test_configuration_md_is_fresh():
    current = config_docs.DOC.read_text()
    assert config_docs.render(current) == current, "docs/configuration.md is stale: run `make docs`"


def test_a_field_without_a_comment_is_caught(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Settings:
        documented: int = 1  # a comment
        bare: int = 2

    assert config_docs.undocumented(Settings) == ["bare"]
    assert "| `documented` | `1` | a comment |" in config_docs.table(Settings)
