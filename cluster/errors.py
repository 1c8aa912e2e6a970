"""Errors a user can fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (config, path, arguments, cluster address)."""


class ConfigError(UserError):
    """A config file or override is invalid; the message names the file and key path."""
