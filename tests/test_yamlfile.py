"""Config files mean what they say (issue #13): the one YAML loader (YAML 1.2, duplicate keys
refused with their line), plain-word validation messages, and settings errors that name the
setting, where to change it and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flags.document import load_document
from flags.errors import ConfigError
from flags.wording import describe_error
from stores.settings import SettingsError, load_settings
from stores.yamlfile import YamlError, load_yaml, read_mapping_file

LIBRARY_WORDS = ("Input should", "should have", "pydantic", "errors.pydantic.dev", "Value error")


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "Off", "NO", "y", "n"])
def test_yaml_1_1_booleans_stay_strings(word: str) -> None:
    """`stage: off` is the string "off" (YAML 1.2), not false as PyYAML's YAML 1.1 reads it."""
    assert load_yaml(f"stage: {word}\n{word}: 0\n") == {"stage": word, word: 0}


def test_readme_stage_table_loads_as_written() -> None:
    """The README's `stages: {off: 0, ...}` is a valid stage table and `stage: off` a stage."""
    raw = load_yaml(
        "stages: {off: 0, internal: 0, beta: 10, open: 50, ga: 100}\n"
        "releases:\n"
        "  web: {stable: ['http://127.0.0.1:1'], canary: ['http://127.0.0.1:2'], stage: off}\n"
        "routes: [{host: '*', path_prefix: /, release: web}]\n"
    )
    document = load_document(raw)
    assert document.stages["off"] == 0
    assert document.releases["web"].stage == "off"


def test_duplicate_key_is_refused_with_its_line() -> None:
    """A second `web:` is refused, naming the line of the duplicate and of the first."""
    text = "releases:\n  web: {stage: beta}\n  api: {}\n  web: {stage: ga}\n"
    with pytest.raises(YamlError) as caught:
        load_yaml(text, "routing.yaml")
    message = str(caught.value)
    assert message.startswith("routing.yaml: line 4")
    assert 'duplicate key "web"' in message
    assert "in the mapping that starts at line 2" in message
    assert "yaml.dev" not in message


def test_syntax_error_names_the_line() -> None:
    """A broken flow sequence names the file and the line, in one line."""
    with pytest.raises(YamlError) as caught:
        load_yaml("a: [1, 2\nb: 3\n", "x.yaml")
    assert str(caught.value).startswith("x.yaml: line 2")
    assert "\n" not in str(caught.value)


def test_values_are_plain_json_data() -> None:
    """A date-like scalar stays the text written; binary data is refused naming the path."""
    assert load_yaml("when: 2026-01-01\n") == {"when": "2026-01-01"}
    with pytest.raises(YamlError, match="blob"):
        load_yaml("blob: !!binary aGVsbG8=\n")


def test_mapping_file_errors_name_the_file(tmp_path: Path) -> None:
    """A missing file, a directory, a list and an empty file are each one clear message."""
    with pytest.raises(YamlError, match="no such file"):
        read_mapping_file(tmp_path / "missing.yaml", "the document")
    with pytest.raises(YamlError, match="is a directory"):
        read_mapping_file(tmp_path, "the document")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n")
    with pytest.raises(YamlError, match="found a list"):
        read_mapping_file(listing, "the document")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(YamlError, match="found an empty file"):
        read_mapping_file(empty, "the document")


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (
            {"releases": {"web": {"stable": [], "canary": ["http://a"]}}},
            "releases.web.stable",
            "must have at least 1 item, got none",
        ),
        (
            {"releases": {"web": {"stable": ["http://a"], "canary": ["http://a"], "stage": 5}}},
            "releases.web.stage",
            "must be text",
        ),
        ({"routes": [{"release": "web", "prio": 1}]}, "routes.0.prio", "unknown field"),
        ({"stages": {"off": "zero"}}, "stages.off", "must be a number, got 'zero'"),
        ({"version": -1}, "version", "must be 0 or more, got -1"),
        ({"routes": [{"host": "*"}]}, "routes.0.release", "is required"),
        ({"releases": []}, "releases", "must be a mapping"),
    ],
)
def test_document_errors_are_plain_words(raw: dict[str, Any], field: str, words: str) -> None:
    """Schema errors name the dotted field in Turnout's words, never the library's."""
    with pytest.raises(ConfigError) as caught:
        load_document(raw)
    assert caught.value.field == field
    assert words in caught.value.message
    assert not any(w in caught.value.message for w in LIBRARY_WORDS)


def test_wording_works_for_any_model() -> None:
    """`describe_error` maps errors of a model it has never seen (a field added tomorrow)."""

    class Future(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: tuple[int, ...] = Field(min_length=2)
        mode: bool = False

    for raw, expected in (
        ({"weights": [1]}, ("weights", "must have at least 2 items")),
        ({"weights": [1, "x"]}, ("weights.1", "must be a whole number")),
        ({"weights": [1, 2], "mode": "perhaps"}, ("mode", "must be true or false")),
    ):
        with pytest.raises(ValidationError) as caught:
            Future.model_validate(raw)
        field, message = describe_error(caught.value.errors(include_url=False)[0])
        assert field == expected[0]
        assert message.startswith(expected[1])
        assert not any(w in message for w in LIBRARY_WORDS)


def test_settings_file_is_yaml_1_2_with_duplicates_refused(tmp_path: Path) -> None:
    """The settings file goes through the same loader: `off` stays a string in an inline
    seed, and a duplicate key is a `SettingsError` with its line."""
    good = tmp_path / "good.yaml"
    good.write_text(
        "edge_port: 9000\n"
        "seed:\n"
        "  releases:\n"
        "    web: {stable: ['http://127.0.0.1:1'], canary: ['http://127.0.0.1:2'], stage: off}\n"
    )
    settings = load_settings(str(good))
    assert settings.edge_port == 9000
    assert settings.seed is not None
    assert settings.seed["releases"]["web"]["stage"] == "off"
    twice = tmp_path / "twice.yaml"
    twice.write_text("edge_port: 1\nadmin_port: 2\nedge_port: 3\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(str(twice))
    assert "line 3" in caught.value.message
    assert "starts at line 1" in caught.value.message


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("edge_port: 70000\n", "edge_port", "must be 65535 or less, got 70000"),
        ("edge_prot: 1\n", "edge_prot", "unknown setting"),
        ("log_level: loud\n", "log_level", "must be one of: debug, info"),
        ("access_log_format: xml\n", "access_log_format", "must be one of: json, human"),
        ("cookie_secure: maybe\n", "cookie_secure", "must be true or false"),
    ],
)
def test_settings_errors_name_the_setting_and_the_value(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    """A bad setting is one `SettingsError`: the setting, the variable, the value, our words."""
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_settings(str(path))
    assert caught.value.field == field
    assert words in caught.value.message
    assert f"TURNOUT_{field.upper()}" in caught.value.message
    assert not any(w in caught.value.message for w in LIBRARY_WORDS)


def test_settings_error_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad `TURNOUT_*` value names the variable and the value given."""
    monkeypatch.setenv("TURNOUT_ADMIN_PORT", "eighty")
    with pytest.raises(SettingsError) as caught:
        load_settings(None)
    assert caught.value.field == "admin_port"
    assert "got 'eighty'" in caught.value.message
    assert "TURNOUT_ADMIN_PORT" in caught.value.message
