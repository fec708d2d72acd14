"""One exception type for every user-facing failure, so the CLI can print one line and exit."""


class QuantError(Exception):
    """A problem with the user's input (model, options, checkpoint); the message is shown as is."""
