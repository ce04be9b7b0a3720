"""Configuration: one small dataclass per area (:mod:`.transcription`, :mod:`.nats`,
:mod:`.cluster`, :mod:`.session`, :mod:`.service`), each declaring its settings once (variable,
flag, default, help, allowed values) and checking its own values; :class:`Settings` composes
them (:mod:`.settings`); flags, the README's table and the log summary are generated from the
same fields (:mod:`.flags`).

Defaults are chosen to work on a laptop; the Kubernetes manifests set the production values.
Bad values fail at start-up with a message naming the variable and flag (:class:`ConfigError`).
"""

from stt.config.base import ConfigError, flag_of
from stt.config.flags import add_arguments, markdown_table, overrides_from_args, settings_summary
from stt.config.settings import FIELDS, Settings, all_fields

__all__ = ["FIELDS", "ConfigError", "Settings", "add_arguments", "all_fields", "flag_of",
           "markdown_table", "overrides_from_args", "settings_summary"]
