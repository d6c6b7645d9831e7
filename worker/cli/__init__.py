"""The ``taskman`` command line."""
