"""The one exception type for errors a user can cause."""


class WiremapError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    The `wiremap` command prints it as one line and exits with status 2.
    """
