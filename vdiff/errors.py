"""The one error type a user can cause, and how the CLI prints it."""


class UserError(Exception):
    """A problem the user can fix (bad config, bad file, bad mesh).

    The message is one line naming the problem and the fix. The CLI prints it
    without a traceback and exits with code 2.
    """
