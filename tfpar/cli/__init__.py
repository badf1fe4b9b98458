"""The `tfpar` command line: a thin layer over the library."""
