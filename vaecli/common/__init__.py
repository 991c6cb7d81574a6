"""What every layer shares: error types, the typed config, atomic files, cache folders, pictures, devices.

Add here only what has no better home and depends on nothing in vaecli but this package.
May import: the standard library and third-party packages only (no other vaecli subpackage).
"""
