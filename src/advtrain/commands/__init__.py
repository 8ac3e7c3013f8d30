"""The work behind each `advtrain` sub-command, one module each; cli.py only parses arguments and calls `run`."""
