"""The base of errors whose message tells the user everything they need (bad config, bad input data).

The CLI prints these as ``error: <message>`` without a traceback; anything else is a bug and keeps its
traceback.
"""


class VisurayError(Exception):
    """An error caused by the input (config, data, artifact), explained by its message."""
