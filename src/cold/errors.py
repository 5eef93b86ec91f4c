"""The one exception type users see for bad input: a clear message, never a traceback."""


class ColdError(ValueError):
    """Bad input (model, adapter, prompt or decoding parameter). The message names the problem."""
