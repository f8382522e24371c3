"""The Python API: one keyword function per command, keyword arguments named as the flags.

``loraq.<name>`` resolves to these lazily (see ``loraq/__init__.py``); each
``loraq <command>`` parses its flags, calls its function here and prints.
"""
