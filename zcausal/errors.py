"""The exception a user's mistake raises, below every other module so that any of them can raise
it (zcausal/placement.py, which runs.run_config calls, among them). Scripts and runs.run_cli name
it runs.UsageError: the same class."""


class UsageError(Exception):
    """Bad input from the user. Scripts print the message as one line and exit with status 2."""
