"""The one error a reader raises for bad input, so the sharder can report it and exit non-zero."""


class DatasetFormatError(ValueError):
    """bad input dataset; the message names the file and expected vs found"""
