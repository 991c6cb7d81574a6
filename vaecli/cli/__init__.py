"""The `vae` command line: parsing, messages and exit codes; every command is one call into the library.

A new command is a function in app.py calling a library function from the layers below.
May import: every vaecli subpackage.
"""
