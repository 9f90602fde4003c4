"""meshd.toml's numbers are checked when the file is read: one line naming the key, at start-up,
not a generation that fails (or a telemetry loop that spins) later."""

import pytest

from meshd.config import ConfigError, load_config


@pytest.mark.parametrize("line, cause", [
    ("quality_floor = 1.5", "quality_floor 1.5 must be a cosine in [0, 1]"),
    ("quality_floor = -0.1", "quality_floor -0.1 must be a cosine in [0, 1]"),
    ("quality_floor = nan", "quality_floor nan must be a cosine in [0, 1]"),
    ("telemetry_interval = 0", "telemetry_interval 0.0 must be a number of seconds above 0"),
    ("telemetry_interval = inf", "telemetry_interval inf must be a number of seconds above 0"),
    ("telemetry_interval = nan", "telemetry_interval nan must be a number of seconds above 0"),
    ("prompt_cache_mib = -1", "prompt_cache_mib -1 must be 0 or more"),
], ids=lambda v: v if " = " in v else "")
def test_a_number_out_of_its_range_is_refused_naming_the_key(tmp_path, line, cause):
    toml = tmp_path / "meshd.toml"
    toml.write_text(f"[meshd]\n{line}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(toml)
    assert str(raised.value).startswith(cause) and "\n" not in str(raised.value)


def test_the_edges_of_each_range_are_accepted(tmp_path):
    toml = tmp_path / "meshd.toml"
    toml.write_text("[meshd]\nquality_floor = 0\ntelemetry_interval = 0.25\nprompt_cache_mib = 0\n")
    config = load_config(toml)
    assert (config.quality_floor, config.telemetry_interval, config.prompt_cache_mib) == (0.0, 0.25, 0)
    toml.write_text("[meshd]\nquality_floor = 1\n")
    assert load_config(toml).quality_floor == 1.0
