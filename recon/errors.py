"""The toolkit's own error type: a message a user can act on.

Every user-facing failure (bad file, wrong shape, missing weights, non-finite
sampler state) is raised as ``ReconError`` (or ``ValueError`` from the
operators); the CLI prints its one-line message and exits with status 2.
"""


class ReconError(Exception):
    """A problem with the user's input or environment, with a suggested fix."""
