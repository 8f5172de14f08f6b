"""The ``deqhess`` command line."""
