"""The one exception type that experiments turn into a one-line error message."""


class PropmapsError(Exception):
    """A problem with the user's input (a flag, a file, a shape) with a clear message.

    The message says what is wrong and what to do; `launch.py` prints it on one line
    and exits non-zero instead of showing a traceback.
    """


class DataError(PropmapsError, ValueError):
    """A data source is missing, corrupt or does not have the expected layout."""


class WeightsError(PropmapsError, ValueError):
    """A checkpoint or Keras file is missing, corrupt or does not fit the model."""
