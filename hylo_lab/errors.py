"""The one error type a user's mistake raises: the CLI prints its message as one line and exits with code 2."""


class UserError(ValueError):
    """Bad input (arguments, files, recipes, paths): the message says what was wrong and what to do."""
