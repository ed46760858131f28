"""The `lidit` command: a thin front that dispatches to lidit/, pipelines/, training/ and serving/.

Nothing imports this package; each subcommand module imports its stage lazily so `lidit --help` stays fast.
"""
