"""Configuration machinery shared by every command (see :mod:`mdm.config.core`)."""

from mdm.config.core import (
    ConfigError,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
)

__all__ = ["ConfigError", "dump_yaml", "from_dict", "load_config", "parse_overrides", "read_yaml", "to_dict"]
