"""The one exception type that experiments turn into a one-line error message."""


class PropmapsError(ValueError):
    """A problem with the user's input (an argument, a file, a shape), clearly said.

    The message says what is wrong and what to do, naming the library's arguments;
    the experiments translate them to their flags (`experiments.common`), and
    `launch.py` prints the message on one line and exits non-zero instead of
    showing a traceback.
    """

    @property
    def problem(self) -> str:
        """What is wrong, for a caller that says itself what it does about it: the
        whole message, less the remedy where the error keeps it apart
        (`RefusedFile`)."""
        return str(self)


class RefusedFile(PropmapsError):
    """A results file that cannot be used: what is wrong with it (`problem`, naming
    the file) and what to do (`remedy`), kept apart for callers that act on the
    problem themselves (rebuilding a finished run's attack.csv from its chunks);
    the message is the two joined by `sep`."""

    def __init__(self, problem: str, remedy: str, sep: str = ": ") -> None:
        super().__init__(f"{problem}{sep}{remedy}")
        self._problem, self.remedy, self.sep = problem, remedy, sep

    @property
    def problem(self) -> str:
        return self._problem

    def __reduce__(self):
        return type(self), (self.problem, self.remedy, self.sep)


class DataError(PropmapsError):
    """A data source is missing, corrupt or does not have the expected layout."""


class WeightsError(PropmapsError):
    """A checkpoint or Keras file is missing, corrupt or does not fit the model."""


class SaliencyError(PropmapsError):
    """A bad saliency argument (method, steps, samples, sigma, score, shapes)."""
