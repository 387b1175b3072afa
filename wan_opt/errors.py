"""The one exception type for mistakes a user can make: printed as one sentence, never as a traceback."""


class WanOptError(Exception):
    """Bad input or an environment problem the user can fix; the message says what to do."""
