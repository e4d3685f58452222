"""The one exception type normgen raises for bad input."""


class NormgenError(ValueError):
    """A layer description, spec file or argument that normgen cannot accept.

    The message names the offending value; the CLI prints it and exits with status 2.
    """
