"""The Python API: one keyword function per command, keyword arguments named as the flags.

``loraq.<name>`` resolves to these lazily (see ``loraq/__init__.py``); each
``loraq <command>`` parses its flags, calls its function here and prints.
"""

# command -> the function of the loraq package that does what it does
COMMAND_API = {
    "train": "train",
    "quantize": "quantize",
    "merge": "merge",
    "export": "export",
    "generate": "generate",
    "chat": "chat",
    "serve": "serve",
    "eval": "evaluate",
    "data": "inspect_data",
    "models": "cached_models",
    "plan": "plan",
}
