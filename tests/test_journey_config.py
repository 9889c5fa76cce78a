"""The journey's configuration: top-level sections, a line's overrides, the command line's assignments."""

from __future__ import annotations

import pytest

from voiceline.config import ConfigError, from_mapping
from voiceline.journey_config import JourneyConfigError, line_overrides, merged, override_tables, parse_assignment
from voiceline.pairing.journey import KeyMap


def test_a_line_overrides_single_keys_of_the_top_level_sections() -> None:
    config = from_mapping(
        {
            "waiting": {"max_wait": 900, "reassure_every": 30.0},
            "talking": {"max_talk": 1200.0, "end_choice_spread": 2.0},
            "keys": {"report": ""},
            "prompts": {"directory": ""},
            "lines": [
                {"name": "night", "numbers": ["300"], "language": "en", "prompts": "/srv/night", "waiting": {"max_wait": 300}},
                {"name": "day", "numbers": ["*"]},
            ],
        }
    )
    night, day = (config.line_journey(line) for line in config.lines)
    assert (night.waiting.max_wait, night.waiting.reassure_every, day.waiting.max_wait) == (300.0, 30.0, 900.0)
    assert night.prompts.directory == "/srv/night" and day.prompts.directory == ""
    settings = night.settings()
    assert settings.max_talk == 1200.0 and settings.max_wait == 300.0 and settings.end_choice_spread == 2.0
    assert settings.keys == KeyMap(report=None)  # "" turns the key off
    assert config.journey.settings().max_wait == 900.0
    assert from_mapping({}).journey.settings().max_talk is None  # 0: no limit


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"waiting": {"max_wait": "long"}}, "waiting.max_wait: expected float"),
        ({"keys": {"help": "#"}}, "each key may have one meaning only"),
        ({"talking": {"max_talk": 30.0}}, "warn_before must lie between 0 and max_talk"),
        ({"talking": {"end_choice_spread": -1.0}}, "journey durations must be positive"),
        ({"lines": [{"name": "x", "numbers": ["1"], "waiting": {"max_wai": 1}}]}, "waiting.max_wai: unknown key"),
        ({"lines": [{"name": "x", "numbers": ["1"], "waiting": {"max_wait": True}}]}, "waiting.max_wait: expected a number"),
        ({"lines": [{"name": "x", "numbers": ["1"], "prompts_dir": "a"}]}, "unknown setting 'prompts_dir'"),
        ({"lines": [{"name": "x", "numbers": ["1"], "talking": {"max_talk": 10}}]}, "[[lines]] x: warn_before"),
        ({"lines": [{"name": "x", "numbers": ["1"], "help": {"method": "fax"}}]}, "[[lines]] x: help.method"),
        ({"lines": [{"name": "x", "numbers": ["1"], "help": {"destination": "tel:112"}}]}, "[[lines]] x: help.destination"),
        ({"lines": [{"name": "x", "numbers": ["1"], "help": {"ring_timeout": 0}}]}, "[[lines]] x: help.ring_timeout"),
        ({"help": {"ring_timeout": 900}}, "help.ring_timeout"),
    ],
)
def test_a_bad_journey_setting_is_refused_naming_it(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_mapping(data)


def test_assignments_are_typed_by_their_key_and_merge_over_a_line_s_own() -> None:
    assert parse_assignment("waiting.max_wait=300") == ("waiting", "max_wait", 300.0)
    assert parse_assignment("welcome.enabled=false") == ("welcome", "enabled", False)
    assert parse_assignment("keys.report=") == ("keys", "report", "")
    for text, message in (
        ("waiting.max_wait=soon", "expected a number"),
        ("welcome.enabled=no", "expected true or false"),
        ("prompts.language=de", "expected SECTION.KEY=VALUE"),  # a line's prompts: --language, --prompts
        ("max_wait=3", "expected SECTION.KEY=VALUE"),
    ):
        with pytest.raises(JourneyConfigError, match=message):
            parse_assignment(text)
    own = line_overrides({"waiting": {"max_wait": 300}, "keys": {"report": ""}})
    both = merged(own, [parse_assignment("waiting.max_wait=240"), parse_assignment("talking.max_talk=900")])
    assert override_tables(both) == {"keys": {"report": ""}, "talking": {"max_talk": 900.0}, "waiting": {"max_wait": 240.0}}


def test_a_line_s_own_help_settings_fall_back_to_the_top_level_ones_key_by_key() -> None:
    config = from_mapping(
        {
            "help": {"destination": "sip:help@crisis.example", "ring_timeout": 20},
            "lines": [
                {"name": "night", "numbers": ["300"], "help": {"destination": "sip:night@crisis.example", "method": "refer"}},
                {"name": "day", "numbers": ["*"]},
            ],
        }
    )
    night, day = (config.line_journey(line).help for line in config.lines)
    assert (night.destination, night.method, night.ring_timeout) == ("sip:night@crisis.example", "refer", 20.0)
    assert (day.destination, day.method, day.ring_timeout) == ("sip:help@crisis.example", "invite", 20.0)
    assert config.lines[0].settings()["help"] == {"destination": "sip:night@crisis.example", "method": "refer"}  # line show


def test_help_assignments_are_checked_at_once_naming_the_key() -> None:
    assert parse_assignment("help.destination=sip:help@crisis.example") == ("help", "destination", "sip:help@crisis.example")
    assert parse_assignment("help.pass_identity=true") == ("help", "pass_identity", True)
    with pytest.raises(JourneyConfigError, match="help.ring_timeout: expected a number"):
        parse_assignment("help.ring_timeout=soon")
    with pytest.raises(JourneyConfigError, match="help.number: unknown key"):
        parse_assignment("help.number=112")
