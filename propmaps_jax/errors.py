"""The one exception type that experiments turn into a one-line error message."""


class PropmapsError(ValueError):
    """A problem with the user's input (an argument, a file, a shape), clearly said.

    The message says what is wrong and what to do, naming the library's arguments;
    the experiments translate them to their flags (`experiments.common`), and
    `launch.py` prints the message on one line and exits non-zero instead of
    showing a traceback.
    """


class DataError(PropmapsError):
    """A data source is missing, corrupt or does not have the expected layout."""


class WeightsError(PropmapsError):
    """A checkpoint or Keras file is missing, corrupt or does not fit the model."""


class SaliencyError(PropmapsError):
    """A bad saliency argument (method, steps, samples, sigma, score, shapes)."""
