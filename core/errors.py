"""The one exception type for bad input, printed as one line at the CLI edge."""


class BadInput(Exception):
    """A problem with what the user gave us (a path, a value, a file).

    The message names the file or value and says what to do; the CLIs print
    it on one line and exit with code 2.
    """
